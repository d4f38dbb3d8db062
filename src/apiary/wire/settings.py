"""Settings of the wire layer: addresses, size limits, deadlines, TLS and private-run credentials."""

from __future__ import annotations

import os
import socket

from pydantic import BaseModel, Field, model_validator

from apiary.wire.identity import public_key_from_peer_id

MiB = 1 << 20
GiB = 1 << 30
_MESSAGE_OVERHEAD = 64 * 1024  # room for a chunk's header and protobuf framing


def _empty_file(value: str) -> bool:
    """Whether `value` names an empty file: the token file of an open run (a Compose bundle mounts
    one for every service, empty unless the run is private)."""
    try:
        return os.path.getsize(value) == 0
    except OSError:
        return False


class WireSettings(BaseModel):
    """How a peer listens, announces itself, and bounds what it sends and accepts."""

    listen_host: str = Field("0.0.0.0", description="interface the gRPC server binds")
    port: int = Field(0, ge=0, le=65535, description="gRPC port to bind (0: any free port)")
    announce_host: str | None = Field(None, description="host other peers dial (default: this host's address)")
    announce_port: int | None = Field(None, ge=1, le=65535, description="port other peers dial (default: the bound port)")
    bulk: bool = Field(True, description="serve the bulk tensor transport beside gRPC")
    bulk_port: int = Field(0, ge=0, le=65535, description="bulk transport port to bind (0: any free port)")
    announce_bulk_port: int | None = Field(None, ge=1, le=65535, description="bulk port other peers dial (default: the bound one)")
    bulk_idle_timeout: float = Field(120.0, gt=0, description="seconds an idle bulk connection is kept open")
    max_message_bytes: int = Field(64 * MiB, ge=MiB, description="largest single gRPC message accepted or sent")
    chunk_bytes: int = Field(4 * MiB, ge=1024, description="tensors larger than this are streamed in chunks")
    max_tensor_bytes: int = Field(GiB, ge=0, description="largest tensor accepted in a stream")
    default_timeout: float = Field(30.0, gt=0, description="deadline of a remote call when the caller sets none")
    shutdown_grace: float = Field(2.0, ge=0, description="seconds in-flight calls get to finish at shutdown")
    max_requests_per_second: float = Field(1000.0, gt=0, description="requests a peer (host) may make per second, on average")
    request_burst: int = Field(2000, ge=1, description="requests a peer may make at once above its rate")
    max_concurrent_per_peer: int = Field(256, ge=1, description="calls a peer may have in flight at once")
    max_concurrent_rpcs: int = Field(2048, ge=1, description="gRPC calls in flight at once, all peers together")
    max_bulk_connections_per_peer: int = Field(128, ge=1, description="bulk connections a peer may keep open")
    max_bytes_in_flight: int = Field(4 * GiB, ge=0, description="tensor and frame bytes being received, all peers together")
    max_bytes_in_flight_per_peer: int | None = Field(
        None, ge=0, description="share of max_bytes_in_flight one peer (host) may hold "
                                "(default: a quarter of it, at least max_tensor_bytes)")
    stream_stall_timeout: float = Field(30.0, gt=0, description="seconds a stream may go without a byte arriving "
                                                                "before it is aborted and its bytes given back")
    max_tracked_peers: int = Field(4096, ge=1, description="peers whose limits are tracked (least recently seen forgotten)")
    max_channels: int = Field(512, ge=1, description="channels to other peers one pool keeps at once: dialling one "
                                                     "more closes the least recently used once its calls end")
    idle_connection_timeout: float = Field(300.0, gt=0, description="seconds a connection this peer dialled may carry no "
                                                                    "call before it closes (the next call dials again); "
                                                                    "a server closes connections idle twice as long")
    tls: bool = Field(True, description="TLS on the public gRPC and bulk ports, servers bound to their peer ids; "
                                         "False (plaintext) only for tests and fully trusted networks")
    run_authority: str | None = Field(None, description="private run: the peer id of the run's authority (none: an open run)")
    access_token: str | None = Field(None, description="private run: this peer's access token, or the file holding it")
    relay: bool = Field(False, description="offer relaying to peers behind NAT on relay_port (apiary.wire.relay)")
    relay_port: int = Field(0, ge=0, le=65535, description="relay port to bind (0: any free port)")
    announce_relay_port: int | None = Field(None, ge=1, le=65535, description="relay port other peers dial "
                                                                                "(default: the bound one)")
    relay_max_reservations: int = Field(128, ge=1, description="peers this relay keeps reservations for at once")
    relay_max_circuits: int = Field(1024, ge=1, description="circuits this relay splices at once, all dialers together")
    relay_max_circuits_per_peer: int = Field(64, ge=1, description="circuits one dialer (host) may have open at once")
    relay_max_handshakes_per_peer: int = Field(32, ge=1, description="connections one host may have at the relay "
                                                                     "before their first frame (handshakes) at once")
    relay_circuit_bytes_per_second: float = Field(0.0, ge=0, description="bytes per second one circuit may carry, "
                                                                         "both ways together (0: unlimited)")
    relay_bytes_per_second: float = Field(0.0, ge=0, description="bytes per second this relay carries in all (0: unlimited)")
    relay_idle_timeout: float = Field(120.0, gt=0, description="seconds a circuit may carry no byte before it is closed")
    relay_reservation_timeout: float = Field(30.0, gt=0, description="seconds a reservation may stay silent (no "
                                                                     "keepalive) before it is dropped")
    relay_punch: bool = Field(True, description="move to a direct connection (hole punching, apiary.wire.relay.punch) "
                                                "with peers reached through a relay, and answer those others try")

    @model_validator(mode="after")
    def _chunks_fit_messages(self) -> WireSettings:
        if self.chunk_bytes + _MESSAGE_OVERHEAD > self.max_message_bytes:
            raise ValueError(
                f"chunk_bytes={self.chunk_bytes} must be at least {_MESSAGE_OVERHEAD} bytes below "
                f"max_message_bytes={self.max_message_bytes}"
            )
        if self.max_bytes_in_flight < self.max_tensor_bytes:
            raise ValueError(
                f"max_bytes_in_flight={self.max_bytes_in_flight} must be at least max_tensor_bytes={self.max_tensor_bytes}"
            )
        if not self.max_tensor_bytes <= self.peer_share <= self.max_bytes_in_flight:
            raise ValueError(
                f"max_bytes_in_flight_per_peer={self.max_bytes_in_flight_per_peer} must lie between "
                f"max_tensor_bytes={self.max_tensor_bytes} and max_bytes_in_flight={self.max_bytes_in_flight}"
            )
        if self.run_authority is not None:
            public_key_from_peer_id(self.run_authority)  # IdentityError (a ValueError) names what is wrong
            if not self.access_token:
                raise ValueError(f"a private run (run_authority={self.run_authority}) needs this peer's access_token "
                                 f"(issue one with `apiary token issue`)")
        elif self.access_token and not _empty_file(self.access_token):
            raise ValueError("access_token is set but run_authority is not: a private run needs both")
        return self

    @property
    def peer_share(self) -> int:
        """The bytes in flight one peer may hold (`max_bytes_in_flight_per_peer` or its default)."""
        if self.max_bytes_in_flight_per_peer is not None:
            return self.max_bytes_in_flight_per_peer
        return min(self.max_bytes_in_flight, max(self.max_tensor_bytes, self.max_bytes_in_flight // 4))

    def for_local_api(self, host: str, port: int) -> WireSettings:
        """The settings of a local API server (a participant's own services call it, from the same
        host or pod): plaintext and open, with no bulk port and nothing announced."""
        return self.model_copy(update={"listen_host": host, "port": port, "announce_host": None, "announce_port": None,
                                       "bulk": False, "tls": False, "run_authority": None, "access_token": None,
                                       "relay": False})

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel and server options shared by both ends of every connection."""
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.enable_retries", 0),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            # each channel its own connections: a peer that failed once (its address now reused by
            # a restarted or new peer) does not fail fresh channels while gRPC's backoff lasts
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_reconnect_backoff_ms", 5_000),
            # a swarm's peers each reach thousands of others over time: idle connections close (the
            # client first; the server after twice as long, for clients that never do), so open
            # connections follow the peers talked to lately, not all the peers ever talked to
            ("grpc.client_idle_timeout_ms", int(self.idle_connection_timeout * 1000)),
            ("grpc.max_connection_idle_ms", int(self.idle_connection_timeout * 2000)),
        ]

    def resolved_announce_host(self) -> str:
        """The host to announce: the configured one, else the listen host, else this host's address."""
        if self.announce_host:
            return self.announce_host
        if self.listen_host not in ("0.0.0.0", "::", ""):
            return self.listen_host
        return default_route_address()


def default_route_address() -> str:
    """This host's address on its default route (no packet is sent), or 127.0.0.1 without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.254.254.254", 1))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"

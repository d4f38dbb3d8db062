"""The relay's control protocol: frames, what is signed, refusals (relay.proto).

A client opens a TCP connection to a relay's port and sends `MAGIC`; the relay answers with a
`Greeting` (its peer id and a fresh nonce); then each side sends length-prefixed frames
(`apiary.wire.framing.Connection`): the client's `ClientFrame`s, the relay's `RelayFrame`s,
each at most `MAX_FRAME_BYTES`. A `Reserve` is signed by the reserving peer over the relay's
peer id and the connection's nonce (`reserve_signed`), an `Accept` likewise with its circuit id
(`accept_signed`), so neither can be replayed on another connection or to another relay. In a
private run, `Reserve` and `Connect` also carry the caller's credentials (`apiary.wire.auth`,
audience: the relay's peer id, digest: `request_digest_of`).

A refusal is a `Refused` frame naming its reason (one of `REASONS`) and the limit; the client
raises it as the `WireError` its status code maps to (`refused_error`).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import grpc

from apiary.wire.address import Endpoint
from apiary.wire.auth import REASONS as ACCESS_REASONS
from apiary.wire.auth import request_digest
from apiary.wire.errors import PeerUnavailable, RequestError, WireError, error_from_status
from apiary.wire.framing import Connection
from apiary.wire.protos.relay_pb2 import (
    BULK,
    GRPC,
    PUNCH,
    Accept,
    ClientFrame,
    Connect,
    Greeting,
    RelayFrame,
    Reserve,
)
from apiary.wire.rpc import decode

MAGIC = b"APIARY-RELAY/1\n"
MAX_FRAME_BYTES = 64 * 1024
NONCE_BYTES = 16
KINDS = {GRPC: "grpc", BULK: "bulk", PUNCH: "punch"}

# refusal reasons: the `reason` label of the relay's refusal counter (and a private run's ACCESS_REASONS)
RESERVATIONS, CIRCUITS, CIRCUITS_PER_PEER = "reservations", "circuits", "circuits_per_peer"
NO_RESERVATION, NOT_ACCEPTED, UNKNOWN_CIRCUIT = "no_reservation", "not_accepted", "unknown_circuit"
MALFORMED, BAD_SIGNATURE, STALLED, HANDSHAKES_PER_PEER = "malformed", "bad_signature", "stalled", "handshakes_per_peer"
REASONS = (RESERVATIONS, CIRCUITS, CIRCUITS_PER_PEER, NO_RESERVATION, NOT_ACCEPTED, UNKNOWN_CIRCUIT, MALFORMED,
           BAD_SIGNATURE, STALLED, HANDSHAKES_PER_PEER, *(f"access_{reason}" for reason in ACCESS_REASONS))


class Refusal(Exception):
    """Raised on the relay's side: answer with a `Refused` frame and close."""

    def __init__(self, reason: str, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.reason, self.code, self.details = reason, code, details

    def frame(self) -> RelayFrame:
        return RelayFrame(refused={"reason": self.reason, "code": self.code.value[0], "details": self.details})


_STATUS_BY_VALUE = {status.value[0]: status for status in grpc.StatusCode}


def refused_error(frame: RelayFrame, relay: Endpoint, what: str) -> WireError:
    """The error a client raises for the relay's `Refused` frame (its message names the reason)."""
    refused = frame.refused
    code = _STATUS_BY_VALUE.get(refused.code, grpc.StatusCode.UNKNOWN)
    return error_from_status(code, f"the relay refused ({refused.reason}): {refused.details}",
                             peer=str(relay), method=what)


def reserve_signed(relay_peer: str, nonce: bytes, peer_id: str) -> bytes:
    """What a `Reserve` signs: this relay, this connection, this peer."""
    return b"\0".join((b"apiary-relay-reserve-v1", relay_peer.encode(), nonce, peer_id.encode()))


def accept_signed(relay_peer: str, nonce: bytes, circuit_id: str, peer_id: str) -> bytes:
    """What an `Accept` signs: this relay, this connection, this circuit, this peer."""
    return b"\0".join((b"apiary-relay-accept-v1", relay_peer.encode(), nonce, circuit_id.encode(), peer_id.encode()))


def request_digest_of(nonce: bytes, request: Reserve | Connect) -> bytes:
    """The digest a private run's signature of a `Reserve` or `Connect` covers (its fields but the
    credentials, and the connection's nonce)."""
    unsigned = type(request)()
    unsigned.CopyFrom(request)
    unsigned.ClearField("metadata")
    return request_digest(nonce + unsigned.SerializeToString(deterministic=True))


async def send(connection: Connection, frame: ClientFrame | RelayFrame) -> None:
    await connection.write_frame(frame)  # type: ignore[arg-type]  # any message frames alike


async def receive(connection: Connection, message_type: type[Any]) -> Any:
    """The next frame; InvalidRequest (PayloadTooLarge) if it is malformed (too large)."""
    return decode(message_type, await connection.read_frame(MAX_FRAME_BYTES))


async def _relay_frame(connection: Connection, relay: Endpoint) -> RelayFrame:
    """The relay's next frame; PeerUnavailable if it is not one."""
    try:
        return await receive(connection, RelayFrame)
    except RequestError as e:
        raise PeerUnavailable(f"the relay at {relay} sent a bad frame: {e}", peer=str(relay)) from None


async def connect_tcp(endpoint: Endpoint, *, local_port: int | None = None,
                      local_host: str | None = None) -> socket.socket:
    """A non-blocking TCP socket connected to `endpoint` (host:port); OSError if it cannot be. With
    `local_port` (0: any), from that port, shared with other sockets (`reusable_socket`); with
    `local_host` (not with `local_port`), from that address of this host."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM) if local_port is None else reusable_socket(family, local_port)
    try:
        if local_host is not None:
            sock.bind((local_host, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


def reusable_socket(family: int, port: int) -> socket.socket:
    """A TCP socket bound to `port` (0: any) that other such sockets may share (SO_REUSEADDR and
    SO_REUSEPORT), as hole punching needs: its connections and its listener use one port."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    except BaseException:
        sock.close()
        raise
    return sock


async def open_control(relay: Endpoint, relay_peer: str | None, timeout: float, *,
                       local_port: int | None = None) -> tuple[Connection, Greeting]:
    """A connection to the relay at `relay` (host:port) past its greeting (from `local_port`, see
    `connect_tcp`); PeerUnavailable if the relay cannot be reached, does not greet, or is not
    `relay_peer` (None: any). Must run within a deadline."""
    connection = Connection(await connect_tcp(relay, local_port=local_port), stall_timeout=timeout)
    try:
        await connection.send(MAGIC)
        frame = await _relay_frame(connection, relay)
        if frame.WhichOneof("frame") == "refused":
            raise refused_error(frame, relay, "relay greeting")
        if frame.WhichOneof("frame") != "greeting" or len(frame.greeting.nonce) != NONCE_BYTES:
            raise PeerUnavailable(f"{relay} is not an apiary relay (no greeting)", peer=str(relay))
        if relay_peer is not None and frame.greeting.relay_peer != relay_peer:
            raise PeerUnavailable(f"the relay at {relay} is peer {frame.greeting.relay_peer}, not {relay_peer}",
                                  peer=str(relay))
    except BaseException:
        connection.close()
        raise
    return connection, frame.greeting


async def expect(connection: Connection, field: str, relay: Endpoint, what: str) -> Any:
    """The relay's next frame, which must be `field` (e.g. "connected"); its refusal raised as an error."""
    frame = await _relay_frame(connection, relay)
    kind = frame.WhichOneof("frame")
    if kind == "refused":
        raise refused_error(frame, relay, what)
    if kind != field:
        raise PeerUnavailable(f"{what} at relay {relay}: expected {field}, got {kind or 'an empty frame'}",
                              peer=str(relay))
    return getattr(frame, field)


def client_frame(message: Reserve | Connect | Accept) -> ClientFrame:
    """The `ClientFrame` holding `message`."""
    frame = ClientFrame()
    getattr(frame, type(message).DESCRIPTOR.name.lower()).CopyFrom(message)
    return frame

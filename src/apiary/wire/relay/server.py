"""The relay: keeps reservations of peers behind NAT and splices dialers' circuits to them.

`RelayServer` listens on its own port (`WireSettings.relay_port`). Each connection is greeted
with a fresh nonce and then is one of three things (`apiary.wire.relay.protocol`); until its
first frame it is a handshake, of which one host may have `relay_max_handshakes_per_peer` at once:
- a reservation (`Reserve`, signed by the reserving peer): kept open, a `Keepalive` answered
  with one, dropped after `relay_reservation_timeout` seconds of silence; a newer reservation of
  the same peer replaces it;
- a dialer's circuit (`Connect`): the relay sends `Incoming` over the target's reservation and
  waits (at most `ACCEPT_SECONDS`) for the target to take it;
- the target's side of a circuit (`Accept`, signed by the target): the relay tells both ends
  `Connected` and splices the two sockets, paced by the per-circuit and total byte rates, until
  both close or neither sends for `relay_idle_timeout` seconds.
Every limit refused is answered with a `Refused` frame naming it and counted by reason; in a
private run `Reserve` and `Connect` must carry a token holder's credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import Awaitable
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from apiary.wire.address import Endpoint
from apiary.wire.auth import AccessRefused, gatekeeper_for
from apiary.wire.errors import RequestError
from apiary.wire.framing import Connection, listening_socket
from apiary.wire.identity import Identity, verify_signature
from apiary.wire.limits import peer_key
from apiary.wire.protos.relay_pb2 import Accept, ClientFrame, Connect, RelayFrame, Reserve
from apiary.wire.relay.protocol import (
    BAD_SIGNATURE,
    CIRCUITS,
    CIRCUITS_PER_PEER,
    HANDSHAKES_PER_PEER,
    KINDS,
    MAGIC,
    MALFORMED,
    NO_RESERVATION,
    NONCE_BYTES,
    NOT_ACCEPTED,
    REASONS,
    RESERVATIONS,
    STALLED,
    UNKNOWN_CIRCUIT,
    Refusal,
    accept_signed,
    receive,
    request_digest_of,
    reserve_signed,
    send,
)
from apiary.wire.relay.splice import Idle, TokenBucket, splice
from apiary.wire.settings import WireSettings

logger = logging.getLogger(__name__)

HANDSHAKE_SECONDS = 10.0  # for a connection's magic line and first frame
ACCEPT_SECONDS = 10.0  # for a reserved peer to take a circuit
LINGER_SECONDS = 1.0  # a refused connection's unread bytes are discarded for this long before it closes


@dataclass(eq=False)
class _Reservation:
    peer_id: str
    connection: Connection
    task: asyncio.Task[None] | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, frame: RelayFrame) -> None:
        async with self.lock:  # circuits' Incoming and keepalive answers, one frame at a time
            await send(self.connection, frame)


@dataclass(eq=False)
class _Pending:
    target: str
    accepted: asyncio.Future[tuple[Connection, str]]


class RelayMetrics:
    """The relay's Prometheus metrics under the server's prefix."""

    def __init__(self, relay: RelayServer, registry: CollectorRegistry, prefix: str):
        Gauge(f"{prefix}_relay_circuits", "Circuits this relay splices now",
              registry=registry).set_function(lambda: relay.circuits)
        Gauge(f"{prefix}_relay_reservations", "Peers holding a reservation at this relay now",
              registry=registry).set_function(lambda: relay.reservations)
        self.opened = Counter(f"{prefix}_relay_circuits_opened", "Circuits this relay spliced", registry=registry)
        self.bytes = Counter(f"{prefix}_relay_bytes", "Bytes this relay carried through circuits, both ways",
                             registry=registry)
        self.refused = Counter(f"{prefix}_relay_refused", "Reservations, circuits and connections refused, by reason",
                               ["reason"], registry=registry)
        for reason in REASONS:
            self.refused.labels(reason)


class RelayServer:
    """Relays for peers that cannot be dialled, on `settings.listen_host:relay_port`."""

    def __init__(self, settings: WireSettings, identity: Identity, *, registry: CollectorRegistry | None = None,
                 prefix: str = "apiary_wire"):
        self.settings = settings
        self.peer_id = identity.peer_id
        self.gate = gatekeeper_for(settings.run_authority, identity, lambda reason: None)  # counted here, by Refusal
        self.metrics = RelayMetrics(self, registry, prefix) if registry is not None else None
        self.refused: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.circuits_opened = 0
        self.bytes_relayed = 0
        self._reservations: dict[str, _Reservation] = {}
        self._pending: dict[str, _Pending] = {}
        self._circuits_by_host: dict[str, int] = {}
        self._handshakes_by_host: dict[str, int] = {}
        self._total_rate = TokenBucket(settings.relay_bytes_per_second)
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def circuits(self) -> int:
        """Circuits being opened or spliced now."""
        return sum(self._circuits_by_host.values())

    @property
    def reservations(self) -> int:
        return len(self._reservations)

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the relay has not started")
        return self._listener.getsockname()[1]

    async def start(self) -> None:
        """Binds and starts accepting; raises OSError naming the address if binding fails."""
        listener = listening_socket(Endpoint(self.settings.listen_host, self.settings.relay_port),
                                    "relayed connections", 256)
        self._listener = listener
        self._spawn(self._accept_loop(listener))

    async def stop(self) -> None:
        """Stops accepting, drops every reservation and circuit, and waits for their tasks."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(listener)
            except OSError as e:  # out of file descriptors, say: serve those open, accept again soon
                logger.warning("the relay could not accept a connection: %s", e)
                await asyncio.sleep(0.1)
                continue
            self._spawn(self._serve(Connection(sock), str(Endpoint(address[0], address[1]))))

    def _count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        if self.metrics is not None:
            self.metrics.refused.labels(reason).inc()

    def _count_bytes(self, nbytes: int) -> None:
        self.bytes_relayed += nbytes
        if self.metrics is not None:
            self.metrics.bytes.inc(nbytes)

    async def _serve(self, connection: Connection, address: str) -> None:
        """One connection to the relay port, from its magic line to its end."""
        kept = False
        try:
            frame, nonce = await self._handshake(connection, address)
            kind = frame.WhichOneof("frame")
            if kind == "reserve":
                await self._reserve(connection, frame.reserve, nonce, address)
            elif kind == "connect":
                await self._connect(connection, frame.connect, nonce, address)
            elif kind == "accept":
                kept = self._accept(connection, frame.accept, nonce, address)
            else:
                raise Refusal(MALFORMED, grpc.StatusCode.INVALID_ARGUMENT,
                              f"a connection starts with reserve, connect or accept, not {kind or 'an empty frame'}")
        except Refusal as e:
            await self._refuse(connection, e)
        except RequestError as e:  # a frame too large or malformed
            await self._refuse(connection, Refusal(MALFORMED, e.code, str(e)))
        except TimeoutError:
            self._count(STALLED)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, Idle):
            pass
        finally:
            if not kept:
                connection.close()

    async def _handshake(self, connection: Connection, address: str) -> tuple[ClientFrame, bytes]:
        """The connection's first frame and the nonce it was greeted with; meanwhile counted among
        its host's handshakes, refused over `relay_max_handshakes_per_peer`."""
        host, limit = peer_key(address), self.settings.relay_max_handshakes_per_peer
        if self._handshakes_by_host.get(host, 0) >= limit:
            raise Refusal(HANDSHAKES_PER_PEER, grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"host {host} already has relay_max_handshakes_per_peer={limit} connections in handshake")
        self._handshakes_by_host[host] = self._handshakes_by_host.get(host, 0) + 1
        try:
            async with asyncio.timeout(HANDSHAKE_SECONDS):
                if await connection.read_exactly(len(MAGIC)) != MAGIC:
                    raise Refusal(MALFORMED, grpc.StatusCode.INVALID_ARGUMENT,
                                  "not an apiary relay connection (bad preamble)")
                nonce = secrets.token_bytes(NONCE_BYTES)
                await send(connection, RelayFrame(greeting={"relay_peer": self.peer_id, "nonce": nonce,
                                                            "observed_address": address}))
                return await receive(connection, ClientFrame), nonce
        finally:
            _release(self._handshakes_by_host, host)

    async def _refuse(self, connection: Connection, refusal: Refusal) -> None:
        """Counts a refusal and answers with it; then discards what the client still sends for a
        moment (closing with unread bytes would reset the connection before the answer is read)."""
        self._count(refusal.reason)
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            await send(connection, refusal.frame())
            connection.sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(LINGER_SECONDS):
                while await connection.loop.sock_recv(connection.sock, 1 << 16):
                    pass

    def _check_access(self, metadata: dict[str, str], method: str, digest: bytes) -> str:
        """The caller's peer id, proven by its private-run credentials ("" in an open run)."""
        if self.gate is None:
            return ""
        try:
            return self.gate.check(metadata.items(), method, digest)
        except AccessRefused as e:
            raise Refusal(f"access_{e.reason}", e.code, str(e)) from None

    async def _reserve(self, connection: Connection, request: Reserve, nonce: bytes, address: str) -> None:
        peer = request.peer_id
        caller = self._check_access(dict(request.metadata), "relay:reserve", request_digest_of(nonce, request))
        if caller and caller != peer:
            raise Refusal("access_token_wrong_key", grpc.StatusCode.PERMISSION_DENIED,
                          f"peer {caller} cannot reserve for peer {peer}")
        if not verify_signature(peer, request.signature, reserve_signed(self.peer_id, nonce, peer)):
            raise Refusal(BAD_SIGNATURE, grpc.StatusCode.UNAUTHENTICATED, f"the reservation is not signed by {peer!r}")
        if peer not in self._reservations and len(self._reservations) >= self.settings.relay_max_reservations:
            raise Refusal(RESERVATIONS, grpc.StatusCode.RESOURCE_EXHAUSTED, f"this relay already holds "
                          f"relay_max_reservations={self.settings.relay_max_reservations} reservations")
        previous = self._reservations.get(peer)
        if previous is not None and previous.task is not None:  # the peer reconnected: its old connection is stale
            previous.task.cancel()
        reservation = self._reservations[peer] = _Reservation(peer, connection, asyncio.current_task())
        timeout = self.settings.relay_reservation_timeout
        try:
            await reservation.send(RelayFrame(reserved={"keepalive_seconds": timeout / 3, "idle_timeout": timeout,
                                                        "observed_address": address}))
            while True:
                async with asyncio.timeout(timeout):  # TimeoutError: silent for too long, dropped
                    frame = await receive(connection, ClientFrame)
                if frame.WhichOneof("frame") != "keepalive":
                    raise Refusal(MALFORMED, grpc.StatusCode.INVALID_ARGUMENT, "a reservation carries only keepalives")
                await reservation.send(RelayFrame(keepalive=frame.keepalive))
        finally:
            if self._reservations.get(peer) is reservation:
                del self._reservations[peer]
                for pending in self._pending.values():
                    if pending.target == peer and not pending.accepted.done():
                        pending.accepted.set_exception(_gone(peer))

    def _open_circuit(self, host: str) -> None:
        """Counts a circuit of the dialer `host`, or refuses one over the limits."""
        if self.circuits >= self.settings.relay_max_circuits:
            raise Refusal(CIRCUITS, grpc.StatusCode.RESOURCE_EXHAUSTED, f"this relay already splices "
                          f"relay_max_circuits={self.settings.relay_max_circuits} circuits")
        if self._circuits_by_host.get(host, 0) >= self.settings.relay_max_circuits_per_peer:
            raise Refusal(CIRCUITS_PER_PEER, grpc.StatusCode.RESOURCE_EXHAUSTED, f"dialer {host} already has "
                          f"relay_max_circuits_per_peer={self.settings.relay_max_circuits_per_peer} circuits open")
        self._circuits_by_host[host] = self._circuits_by_host.get(host, 0) + 1

    async def _connect(self, connection: Connection, request: Connect, nonce: bytes, address: str) -> None:
        caller = self._check_access(dict(request.metadata), "relay:connect", request_digest_of(nonce, request))
        if request.kind not in KINDS:
            raise Refusal(MALFORMED, grpc.StatusCode.INVALID_ARGUMENT, f"unknown circuit kind {request.kind}")
        reservation = self._reservations.get(request.target_peer)
        if reservation is None:
            raise _gone(request.target_peer)
        host = peer_key(address)
        self._open_circuit(host)
        circuit_id = secrets.token_hex(16)
        pending = self._pending[circuit_id] = _Pending(request.target_peer, asyncio.get_running_loop().create_future())
        try:
            await reservation.send(RelayFrame(incoming={"circuit_id": circuit_id, "kind": request.kind,
                                                        "dialer_address": address, "dialer_peer": caller}))
            try:
                async with asyncio.timeout(ACCEPT_SECONDS):
                    accepted, accepted_address = await pending.accepted
            except TimeoutError:
                raise Refusal(NOT_ACCEPTED, grpc.StatusCode.UNAVAILABLE, f"peer {request.target_peer} did not take "
                              f"the circuit within {ACCEPT_SECONDS:g} s") from None
            del self._pending[circuit_id]
            await send(accepted, RelayFrame(connected={"circuit_id": circuit_id, "peer_address": address}))
            await send(connection, RelayFrame(connected={"circuit_id": circuit_id, "peer_address": accepted_address}))
            self.circuits_opened += 1
            if self.metrics is not None:
                self.metrics.opened.inc()
            rates = [TokenBucket(self.settings.relay_circuit_bytes_per_second), self._total_rate]
            await splice(connection.sock, accepted.sock, idle_timeout=self.settings.relay_idle_timeout,
                         buckets=rates, on_bytes=self._count_bytes)
        finally:
            self._pending.pop(circuit_id, None)
            _release(self._circuits_by_host, host)
            if pending.accepted.done() and not pending.accepted.cancelled() and pending.accepted.exception() is None:
                pending.accepted.result()[0].close()  # also when this dialer gave up as the target's connection came

    def _accept(self, connection: Connection, request: Accept, nonce: bytes, address: str) -> bool:
        """Hands the target's connection to the circuit's dialer; True once it is handed over."""
        pending = self._pending.get(request.circuit_id)
        if pending is None or pending.accepted.done():
            raise Refusal(UNKNOWN_CIRCUIT, grpc.StatusCode.NOT_FOUND, "no circuit waits under this id (too late?)")
        signed = accept_signed(self.peer_id, nonce, request.circuit_id, pending.target)
        if request.peer_id != pending.target or not verify_signature(pending.target, request.signature, signed):
            raise Refusal(BAD_SIGNATURE, grpc.StatusCode.UNAUTHENTICATED,
                          f"the circuit is not accepted by its target {pending.target}")
        pending.accepted.set_result((connection, address))
        return True


def _release(counts: dict[str, int], host: str) -> None:
    """One of `host`'s connections counted in `counts` is done (a host with none is dropped)."""
    left = counts[host] - 1
    if left:
        counts[host] = left
    else:
        del counts[host]


def _gone(peer: str) -> Refusal:
    return Refusal(NO_RESERVATION, grpc.StatusCode.UNAVAILABLE, f"peer {peer} holds no reservation at this relay")

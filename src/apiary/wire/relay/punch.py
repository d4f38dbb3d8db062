"""Direct connections between peers that reach each other through a relay (hole punching).

A dialer that reached a peer through a relay tries, in the background, to open a direct TCP
connection to it; calls never wait for it. The two coordinate over a `punch` circuit:
1. each side learns its public mapping of a fresh local port P: it opens a connection to the
   relay FROM P (SO_REUSEADDR and SO_REUSEPORT, so P can be used again) and reads the address
   the relay's greeting says it came from;
2. the dialer sends its offer (the kind of connection it wants, grpc or bulk, a nonce and its
   mapping), the target answers with its own nonce and mapping (`Offer`); an offer whose host
   is not the dialer's as the relay saw it is refused: nobody can make a target dial a third party;
3. both listen on P and connect from P to the other's mapping at once, retrying refused
   attempts for at most `CONNECT_SECONDS`: behind endpoint-independent (cone) NATs each side's
   SYN opens the hole the other's comes through (TCP simultaneous open); where one side can be
   dialled (loopback, a public peer) its listener takes the other's connection;
4. on each connection that results, the dialer sends the target's nonce and the target, once
   it checked it, the dialer's: a stray connection is never taken (and learns nothing from the
   target); the dialer picks one (`CHOSEN`) and speaks TLS over it, bound to the target's peer
   id like every connection; the target splices it to its own gRPC or bulk port like a circuit
   of that kind.

Each punched socket is one connection: `Puncher` (the dialer's side, shared by a `ChannelPool`
and its `BulkClient`s) keeps at most one ready per relayed endpoint and kind, punches again
when a connection had to go through the relay, and does not retry a peer whose punch failed
(a symmetric NAT) for `RETRY_AFTER_SECONDS`: it stays relayed. A gRPC channel is moved to the
direct connection by its pool when one is ready (new calls; calls in flight finish on the old
one). `PunchTarget` is the target's side, the handler of `punch` circuits in `Reservations`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from apiary.wire.address import AddressError, Endpoint
from apiary.wire.auth import CallCredentials
from apiary.wire.errors import WireError
from apiary.wire.framing import Connection
from apiary.wire.protos.relay_pb2 import BULK, GRPC, PUNCH, Incoming
from apiary.wire.relay.dial import open_circuit
from apiary.wire.relay.protocol import KINDS, NONCE_BYTES, open_control, reusable_socket

logger = logging.getLogger(__name__)

Handler = Callable[[socket.socket, Incoming], Awaitable[None]]

OFFER_MAGIC = b"APIARY-PUNCH/1\n"  # starts each side's offer on the punch circuit
DIRECT_MAGIC = b"APIARY-DIRECT/1\n"  # starts each side's nonce on a direct connection
CHOSEN = b"\x01"  # the dialer's last byte before TLS on the connection it takes
MAX_ADDRESS_BYTES = 300
CONNECT_SECONDS = 3.0  # for the simultaneous connect, once the offers are exchanged
ATTEMPT_INTERVAL = 0.05  # between connection attempts that were refused at once
MAX_ATTEMPTS = 40
RETRY_AFTER_SECONDS = 300.0  # a peer whose punch failed stays relayed this long
PUNCHED_KINDS = (GRPC, BULK)

_PUNCH_ERRORS = (WireError, OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError, AddressError)


class PunchFailed(Exception):
    """No direct connection resulted (the message says at which step)."""


@dataclass(frozen=True)
class Offer:
    """One side's part of the coordination: what it wants, its nonce, its public mapping."""

    kind: int
    nonce: bytes
    address: Endpoint

    def encode(self) -> bytes:
        address = str(self.address).encode()
        return OFFER_MAGIC + bytes([self.kind]) + self.nonce + len(address).to_bytes(2, "big") + address

    @classmethod
    async def read(cls, connection: Connection) -> Offer:
        """The other side's offer; PunchFailed if it is not one."""
        head = await connection.read_exactly(len(OFFER_MAGIC) + 1 + NONCE_BYTES + 2)
        if head[: len(OFFER_MAGIC)] != OFFER_MAGIC:
            raise PunchFailed("the other side sent no punch offer")
        size = int.from_bytes(head[-2:], "big")
        if size > MAX_ADDRESS_BYTES:
            raise PunchFailed(f"a punch offer with an address of {size} bytes")
        address = Endpoint.parse((await connection.read_exactly(size)).decode(errors="replace"))
        if address.relayed:
            raise PunchFailed(f"a punch offer with a relayed address {address}")
        return cls(head[len(OFFER_MAGIC)], bytes(head[len(OFFER_MAGIC) + 1 : -2]), address)


async def own_mapping(relay: Endpoint, relay_peer: str | None, timeout: float) -> tuple[int, Endpoint]:
    """A fresh local port and its public mapping: the address the relay saw a connection from it
    come from (within `timeout` seconds)."""
    async with asyncio.timeout(timeout):
        connection, greeting = await open_control(relay, relay_peer, timeout, local_port=0)
    try:
        return connection.sock.getsockname()[1], Endpoint.parse(greeting.observed_address)
    finally:
        connection.close()


async def connect_direct(port: int, remote: Endpoint, own_nonce: bytes, peer_nonce: bytes, *, dialer: bool,
                         seconds: float = CONNECT_SECONDS) -> socket.socket | None:
    """Listens on `port` and connects from it to `remote` at once (refused attempts retried);
    returns the first connection on which the other side proved `own_nonce` (the dialer's: the
    one it chose, told with `CHOSEN`), or None after `seconds`."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in remote.host else socket.AF_INET
    winner: asyncio.Future[socket.socket] = loop.create_future()
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def check(sock: socket.socket) -> None:
        taken = False
        try:
            connection = Connection(sock)
            if dialer:
                await connection.send(DIRECT_MAGIC + peer_nonce)
            if await connection.read_exactly(len(DIRECT_MAGIC) + NONCE_BYTES) != DIRECT_MAGIC + own_nonce:
                return  # a stray connection
            if not dialer:  # answered only once the dialer proved itself; then its choice is awaited
                await connection.send(DIRECT_MAGIC + peer_nonce)
                if await connection.read_exactly(len(CHOSEN)) != CHOSEN:
                    return
            if not winner.done():
                winner.set_result(sock)
                taken = True
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if not taken:
                sock.close()

    async def accept(listener: socket.socket) -> None:
        while True:
            sock, _ = await loop.sock_accept(listener)
            spawn(check(sock))

    async def connect() -> None:
        for _ in range(MAX_ATTEMPTS):
            sock = reusable_socket(family, port)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (remote.host, remote.port))
            except OSError:  # refused (nobody on the port yet) or the tuple is taken by an accepted one
                sock.close()
                await asyncio.sleep(ATTEMPT_INTERVAL)
                continue
            except BaseException:
                sock.close()
                raise
            spawn(check(sock))
            return

    listener = reusable_socket(family, port)
    try:
        listener.listen(8)
        listener.setblocking(False)
        spawn(accept(listener))
        spawn(connect())
        async with asyncio.timeout(seconds):
            direct = await winner
    except TimeoutError:
        return None
    finally:
        listener.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if dialer:
        try:
            await loop.sock_sendall(direct, CHOSEN)
        except OSError:
            direct.close()
            return None
    return direct


async def punch(endpoint: Endpoint, kind: int, *, credentials: CallCredentials | None, timeout: float,
                seconds: float = CONNECT_SECONDS) -> socket.socket:
    """A direct connection to the target of the relayed `endpoint`, for a connection of `kind`
    (grpc or bulk), coordinated over a punch circuit; PunchFailed (or the circuit's WireError,
    OSError) if none results. The caller speaks TLS over it, bound to the target's peer id."""
    circuit, mapping = await asyncio.gather(
        open_circuit(endpoint, kind=PUNCH, credentials=credentials, timeout=timeout),
        own_mapping(endpoint.direct, endpoint.relay_peer, timeout), return_exceptions=True)
    if isinstance(circuit, BaseException) or isinstance(mapping, BaseException):
        if isinstance(circuit, socket.socket):
            circuit.close()
        raise circuit if isinstance(circuit, BaseException) else mapping  # type: ignore[misc]
    port, address = mapping
    connection = Connection(circuit, stall_timeout=timeout)
    try:
        nonce = secrets.token_bytes(NONCE_BYTES)
        async with asyncio.timeout(timeout):
            await connection.send(Offer(kind, nonce, address).encode())
            answer = await Offer.read(connection)
        direct = await connect_direct(port, answer.address, nonce, answer.nonce, dialer=True, seconds=seconds)
    finally:
        connection.close()
    if direct is None:
        raise PunchFailed(f"no direct connection from {address} to {answer.address} within {seconds:g} s")
    return direct


class PunchTarget:
    """The target's side: the handler of `punch` circuits. A connection that results is handed
    to the handler of the kind the dialer asked for (`handlers`, e.g. spliced to the gRPC port)."""

    def __init__(self, handlers: Mapping[int, Handler], *, timeout: float, seconds: float = CONNECT_SECONDS):
        self.handlers = handlers
        self.timeout = timeout
        self.seconds = seconds

    async def __call__(self, circuit: socket.socket, incoming: Incoming) -> None:
        connection = Connection(circuit, stall_timeout=self.timeout)
        try:
            async with asyncio.timeout(self.timeout):
                offer = await Offer.read(connection)
                handler = self.handlers.get(offer.kind) if offer.kind in PUNCHED_KINDS else None
                if handler is None:
                    raise PunchFailed(f"a punch for circuits of kind {offer.kind}, which are not served here")
                dialer_host = Endpoint.parse(incoming.dialer_address).host
                if offer.address.host != dialer_host:  # never made to dial a third party
                    raise PunchFailed(f"the offer names {offer.address}, not the dialer's host {dialer_host}")
                relay_host, relay_port = circuit.getpeername()[:2]
                port, address = await own_mapping(Endpoint(relay_host, relay_port), None, self.timeout)
                nonce = secrets.token_bytes(NONCE_BYTES)
                await connection.send(Offer(offer.kind, nonce, address).encode())
            direct = await connect_direct(port, offer.address, nonce, offer.nonce, dialer=False, seconds=self.seconds)
        except (PunchFailed, *_PUNCH_ERRORS) as e:
            logger.info("a punch from %s failed: %s", incoming.dialer_address, e or type(e).__name__)
            return
        finally:
            connection.close()
        if direct is None:
            logger.info("a punch from %s (%s) found no direct connection", incoming.dialer_address, offer.address)
            return
        logger.info("direct %s connection with %s", KINDS[offer.kind], offer.address)
        await handler(direct, incoming)


class Puncher:
    """The dialer's side: direct connections to relayed endpoints, punched in the background.

    `dial` hands out a ready direct socket when there is one, else opens a circuit through the
    relay and starts a punch for the next connection. Listeners given to `on_direct` are told
    each endpoint and kind for which a direct socket became ready."""

    def __init__(self, credentials: CallCredentials | None, *, timeout: float, enabled: bool = True,
                 seconds: float = CONNECT_SECONDS, retry_after: float = RETRY_AFTER_SECONDS):
        self.credentials = credentials
        self.timeout = timeout
        self.enabled = enabled
        self.seconds = seconds
        self.retry_after = retry_after
        self.attempted = self.succeeded = self.failed = 0
        self._ready: dict[tuple[Endpoint, int], socket.socket] = {}
        self._running: dict[tuple[Endpoint, int], asyncio.Task[None]] = {}
        self._failed_until: dict[str, float] = {}  # target peer id -> when it may be punched again
        self._listeners: list[Callable[[Endpoint, int], None]] = []

    def on_direct(self, listener: Callable[[Endpoint, int], None]) -> None:
        self._listeners.append(listener)

    async def dial(self, endpoint: Endpoint, kind: int, *, timeout: float) -> tuple[socket.socket, bool]:
        """A socket to the target of the relayed `endpoint` for a connection of `kind`, and whether
        it goes through the relay (False: a punched, direct one)."""
        direct = self.take(endpoint, kind)
        if direct is not None:
            return direct, False
        circuit = await open_circuit(endpoint, kind=kind, credentials=self.credentials, timeout=timeout)
        self.want(endpoint, kind)
        return circuit, True

    def ready(self, endpoint: Endpoint, kind: int) -> bool:
        """Whether a direct socket waits for the next connection of `kind` to `endpoint`."""
        return (endpoint, kind) in self._ready

    def take(self, endpoint: Endpoint, kind: int) -> socket.socket | None:
        """The direct socket waiting for `endpoint` and `kind` (None: none, or it was closed meanwhile)."""
        sock = self._ready.pop((endpoint, kind), None)
        if sock is None:
            return None
        try:
            if sock.recv(1, socket.MSG_PEEK) == b"":  # the target closed it while it waited
                sock.close()
                return None
        except BlockingIOError:
            pass  # nothing to read: open
        except OSError:
            sock.close()
            return None
        return sock

    def want(self, endpoint: Endpoint, kind: int) -> None:
        """Punches `endpoint` for a connection of `kind` in the background, unless one waits or is
        being punched, or this peer's punch failed less than `retry_after` seconds ago."""
        key = (endpoint, kind)
        if (not self.enabled or kind not in PUNCHED_KINDS or not endpoint.relayed or key in self._ready
                or key in self._running or self._failed_until.get(endpoint.target_peer, 0.0) > time.monotonic()):
            return
        task = self._running[key] = asyncio.ensure_future(self._punch(endpoint, kind))
        task.add_done_callback(lambda _: self._running.pop(key, None))

    async def _punch(self, endpoint: Endpoint, kind: int) -> None:
        self.attempted += 1
        try:
            sock = await punch(endpoint, kind, credentials=self.credentials, timeout=self.timeout, seconds=self.seconds)
        except (PunchFailed, *_PUNCH_ERRORS) as e:
            self.failed += 1
            self._failed_until[endpoint.target_peer] = time.monotonic() + self.retry_after
            logger.info("no direct connection to %s (stays relayed for %.0f s): %s", endpoint, self.retry_after,
                        e or type(e).__name__)
            return
        self.succeeded += 1
        self._failed_until.pop(endpoint.target_peer, None)
        previous = self._ready.pop((endpoint, kind), None)
        if previous is not None:
            previous.close()
        self._ready[(endpoint, kind)] = sock
        logger.info("direct %s connection to %s", KINDS[kind], endpoint)
        for listener in self._listeners:
            try:
                listener(endpoint, kind)
            except Exception:  # noqa: BLE001 - one listener's failure must not stop the others
                logger.exception("a listener of direct connections failed")

    def export(self, registry: CollectorRegistry, prefix: str = "apiary_wire") -> None:
        """Registers `<prefix>_punches_total{outcome}` (attempted, succeeded, failed) in `registry`."""
        registry.register(_PunchCollector(self, prefix))

    async def close(self) -> None:
        """Cancels the punches under way and closes the sockets that wait."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ready, self._ready = list(self._ready.values()), {}
        for sock in ready:
            sock.close()


class _PunchCollector(Collector):
    def __init__(self, puncher: Puncher, prefix: str):
        self.puncher = puncher
        self.prefix = prefix

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(f"{self.prefix}_punches", "Direct connections tried to peers reached through "
                                     "a relay, by outcome (attempted, succeeded, failed)", labels=["outcome"])
        for outcome in ("attempted", "succeeded", "failed"):
            family.add_metric([outcome], getattr(self.puncher, outcome))
        yield family

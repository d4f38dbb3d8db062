"""The side of a peer behind NAT: reservations at relays, and the circuits they bring.

`Reservations` keeps `count` reservations among the relays that its `relays()` callable names
(e.g. read from the DHT). To fill a free place it tries a few more relays than it needs at
once and keeps the fastest to answer (lowest connect latency); a relay that fails or drops the
reservation is retried only after a backoff that doubles up to `MAX_BACKOFF_SECONDS`. Each
reservation sends a keepalive every few seconds and is given up when the relay falls silent
for two of them, or closes it; its place is filled again at once. When the relay announces an
incoming circuit, this peer opens a new connection to the relay, accepts it (signed), and
hands the socket to the handler of its kind: a `grpc` circuit is spliced to the server's own
gRPC port (from a loopback address picked per dialer's host, `splice_source`, so that relayed
callers do not share one bucket of per-peer limits), a `bulk` one served by its bulk server
directly (the dialer's host, as the relay saw it, bearing the per-peer limits); a `punch` one
coordinates a direct connection, served then like the kind it is for (`apiary.wire.relay.punch`;
unless `relay_punch` is off); other kinds can be added with `add_handler`. `endpoints` are this
server's relayed endpoints, primary (fastest) first; `on_change` is called whenever they change.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from apiary.wire.address import AddressError, Endpoint, PeerAddress
from apiary.wire.auth import CallCredentials
from apiary.wire.errors import WireError
from apiary.wire.framing import Connection
from apiary.wire.identity import Identity
from apiary.wire.limits import peer_key
from apiary.wire.protos.relay_pb2 import BULK, GRPC, PUNCH, Accept, ClientFrame, Incoming, RelayFrame, Reserve, Reserved
from apiary.wire.relay.protocol import (
    accept_signed,
    client_frame,
    connect_tcp,
    expect,
    open_control,
    receive,
    request_digest_of,
    reserve_signed,
    send,
)
from apiary.wire.relay.punch import PunchTarget
from apiary.wire.relay.splice import splice

if TYPE_CHECKING:
    from apiary.wire.client import ChannelPool
    from apiary.wire.server import RpcServer

logger = logging.getLogger(__name__)

Handler = Callable[[socket.socket, Incoming], Awaitable[None]]

SPARE_ATTEMPTS = 2  # relays tried beyond those needed, the slowest then let go
BASE_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
CHECK_SECONDS = 1.0  # how often missing reservations are looked for


@dataclass(eq=False)
class _Held:
    relay: PeerAddress
    connection: Connection
    latency: float
    reserved: Reserved


class Reservations:
    """Keeps `count` reservations for `server` among the relays `relays()` returns."""

    def __init__(self, server: RpcServer, pool: ChannelPool, relays: Callable[[], Awaitable[list[PeerAddress]]], *,
                 count: int = 2, on_change: Callable[[], None] | None = None, keepalive: float = 5.0,
                 timeout: float = 5.0):
        if count < 1:
            raise ValueError(f"count={count}: keep at least one reservation")
        self.server = server
        self.pool = pool
        self.relays = relays
        self.count = count
        self.on_change = on_change
        self.keepalive = keepalive  # seconds between keepalives (fewer if the relay asks)
        self.timeout = timeout  # for each step: reaching a relay, reserving, accepting a circuit
        self._held: dict[str, _Held] = {}
        self._failures: dict[str, tuple[float, int]] = {}  # relay peer id -> (retry after, failures in a row)
        self._handlers: dict[int, Handler] = {GRPC: self._to_grpc, BULK: self._to_bulk}
        if server.settings.relay_punch:
            self._handlers[PUNCH] = PunchTarget(self._handlers, timeout=timeout)
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._maintainer: asyncio.Task[None] | None = None

    @property
    def endpoints(self) -> list[Endpoint]:
        """This server's relayed endpoints (one per reservation held), primary (fastest) first."""
        held = sorted(self._held.values(), key=lambda h: h.latency)
        return [Endpoint.relayed_to(h.relay, self.server.identity.peer_id) for h in held]

    def add_handler(self, kind: int, handler: Handler) -> None:
        """Serves the circuits of `kind` with `handler`, which owns the socket it is given."""
        self._handlers[kind] = handler

    async def start(self) -> None:
        self._maintainer = asyncio.create_task(self._maintain(), name="apiary-relay-reservations")

    async def stop(self) -> None:
        """Gives up every reservation and circuit and waits for their tasks."""
        held, self._held = list(self._held.values()), {}  # given up, not lost: no backoff, no on_change
        tasks = [*self._tasks, *([self._maintainer] if self._maintainer else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._maintainer = None
        for reservation in held:
            reservation.connection.close()

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _changed_now(self) -> None:
        self._changed.set()
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # noqa: BLE001 - a listener's failure must not stop the reservations
                logger.exception("on_change of the relay reservations failed")

    async def _maintain(self) -> None:
        while True:
            self._changed.clear()
            missing = self.count - len(self._held)
            if missing > 0:
                await self._fill(missing)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CHECK_SECONDS if len(self._held) < self.count else None):
                    await self._changed.wait()

    async def _candidates(self) -> list[PeerAddress]:
        try:
            async with asyncio.timeout(self.timeout):
                relays = await self.relays()
        except Exception as e:  # noqa: BLE001 - no relays this time; asked again in a moment
            logger.warning("could not list relays: %s", e)
            return []
        now, own = time.monotonic(), self.server.identity.peer_id
        usable: dict[str, PeerAddress] = {}
        for relay in relays:
            if (relay.peer_id and relay.peer_id != own and relay.peer_id not in self._held
                    and not relay.endpoint.relayed and self._failures.get(relay.peer_id, (0.0, 0))[0] <= now):
                usable.setdefault(relay.peer_id, relay)
        candidates = list(usable.values())
        random.shuffle(candidates)
        return candidates

    async def _fill(self, missing: int) -> None:
        """Tries `missing` + spare relays at once and keeps the `missing` fastest."""
        attempts = (await self._candidates())[: missing + SPARE_ATTEMPTS]
        results = await asyncio.gather(*(self._reserve(relay) for relay in attempts), return_exceptions=True)
        held = sorted((r for r in results if isinstance(r, _Held)), key=lambda h: h.latency)
        for relay, result in zip(attempts, results):
            if isinstance(result, BaseException):
                self._failed(relay, result)
        for extra in held[missing:]:
            extra.connection.close()
        for kept in held[:missing]:
            self._held[kept.relay.peer_id] = kept  # type: ignore[index]
            self._failures.pop(kept.relay.peer_id, None)  # type: ignore[arg-type]
            self._spawn(self._hold(kept))
        if held:
            logger.info("relay reservations: %s", ", ".join(str(e) for e in self.endpoints))
            self._changed_now()

    def _failed(self, relay: PeerAddress, error: BaseException) -> None:
        failures = self._failures.get(relay.peer_id, (0.0, 0))[1] + 1  # type: ignore[arg-type]
        backoff = min(MAX_BACKOFF_SECONDS, BASE_BACKOFF_SECONDS * 2 ** (failures - 1))
        self._failures[relay.peer_id] = (time.monotonic() + backoff, failures)  # type: ignore[index]
        logger.info("relay %s: %s (next try in %.0f s)", relay, error, backoff)

    async def _reserve(self, relay: PeerAddress) -> _Held:
        started = time.monotonic()
        connection, reserved = await reserve(relay, self.server.identity, self.pool.credentials, self.timeout)
        return _Held(relay, connection, time.monotonic() - started, reserved)

    async def _hold(self, held: _Held) -> None:
        """Keeps a reservation alive and takes its circuits, until the relay closes or falls silent."""
        interval = min(self.keepalive, held.reserved.keepalive_seconds or self.keepalive)
        sender = asyncio.ensure_future(self._keep_alive(held.connection, interval))
        try:
            while True:
                async with asyncio.timeout(2 * interval):  # the relay answers each keepalive
                    frame = await receive(held.connection, RelayFrame)
                if frame.WhichOneof("frame") == "incoming":
                    self._spawn(self._take(held.relay, frame.incoming))
                elif frame.WhichOneof("frame") != "keepalive":
                    logger.warning("relay %s sent %s on a reservation: given up", held.relay, frame.WhichOneof("frame"))
                    break
        except (TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError, WireError) as e:
            logger.info("the reservation at relay %s ended: %s", held.relay, e or type(e).__name__)
        except Exception as e:  # noqa: BLE001 - a bad frame (InvalidRequest): this relay is given up
            logger.warning("the reservation at relay %s ended: %s", held.relay, e)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
            held.connection.close()
            if self._held.get(held.relay.peer_id) is held:  # type: ignore[arg-type]
                del self._held[held.relay.peer_id]  # type: ignore[arg-type]
                self._failed(held.relay, ConnectionError("reservation lost"))
                self._changed_now()

    @staticmethod
    async def _keep_alive(connection: Connection, interval: float) -> None:
        sequence = 0
        while True:
            await asyncio.sleep(interval)
            sequence += 1
            await send(connection, ClientFrame(keepalive={"sequence": sequence}))

    async def _take(self, relay: PeerAddress, incoming: Incoming) -> None:
        """Accepts one circuit on a new connection to the relay and hands it to its kind's handler."""
        handler = self._handlers.get(incoming.kind)
        if handler is None:
            logger.info("a circuit of kind %d from %s: no handler, not taken", incoming.kind, incoming.dialer_address)
            return
        own = self.server.identity
        try:
            async with asyncio.timeout(self.timeout):
                connection, greeting = await open_control(relay.endpoint, relay.peer_id, self.timeout)
                try:
                    signed = accept_signed(greeting.relay_peer, greeting.nonce, incoming.circuit_id, own.peer_id)
                    await send(connection, client_frame(Accept(circuit_id=incoming.circuit_id, peer_id=own.peer_id,
                                                               signature=own.sign(signed))))
                    await expect(connection, "connected", relay.endpoint, "relay accept")
                except BaseException:
                    connection.close()
                    raise
        except (TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError, WireError) as e:
            logger.info("a circuit from %s through relay %s was not taken: %s", incoming.dialer_address, relay, e)
            return
        await handler(connection.sock, incoming)

    async def _to_grpc(self, circuit: socket.socket, incoming: Incoming) -> None:
        """Splices a gRPC circuit to this server's own gRPC port (grpc.aio takes no sockets)."""
        endpoint = self.server.local_endpoint
        source = splice_source(incoming.dialer_address, endpoint.host)
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    local = await connect_tcp(endpoint, local_host=source)
                except OSError:
                    if source is None:
                        raise
                    local = await connect_tcp(endpoint)  # no such source here (not Linux?): as this host
        except (TimeoutError, OSError) as e:
            logger.warning("a relayed gRPC circuit could not reach this server: %s", e)
            circuit.close()
            return
        with contextlib.suppress(Exception):  # the circuit ended, however it ended
            await splice(circuit, local, idle_timeout=self.server.settings.relay_idle_timeout)

    async def _to_bulk(self, circuit: socket.socket, incoming: Incoming) -> None:
        """Hands a bulk circuit to this server's bulk server, as if accepted there from the dialer."""
        if self.server.bulk is None:
            circuit.close()
            return
        try:
            dialer = Endpoint.parse(incoming.dialer_address)
        except AddressError:
            dialer = Endpoint("relayed", 0)
        self.server.bulk.serve_socket(circuit, dialer)


def splice_source(dialer_address: str, server_host: str) -> str | None:
    """The address a relayed gRPC circuit of the dialer at `dialer_address` (as its relay saw it)
    reaches this server's gRPC port at `server_host` from: with IPv4 loopback, one in 127.1.0.1 to
    127.254.255.254 (all of 127/8 is this host on Linux) picked by a hash of the dialer's host, so
    that the server's per-peer limits tell relayed dialers apart; None (the default) otherwise."""
    try:
        server = ipaddress.ip_address(server_host)
    except ValueError:  # a name
        return None
    if server.version != 4 or not server.is_loopback:
        return None
    digest = hashlib.sha256(peer_key(dialer_address).encode()).digest()
    return f"127.{1 + digest[0] % 254}.{digest[1]}.{1 + digest[2] % 254}"


async def reserve(relay: PeerAddress, identity: Identity, credentials: CallCredentials | None,
                  timeout: float) -> tuple[Connection, Reserved]:
    """A reservation of `identity` at `relay` (`peer_id@host:port`) made within `timeout` seconds:
    its control connection and the relay's terms. The relay's refusal is raised as the WireError
    its code maps to, naming the limit."""
    async with asyncio.timeout(timeout):
        connection, greeting = await open_control(relay.endpoint, relay.peer_id, timeout)
        try:
            request = Reserve(peer_id=identity.peer_id,
                              signature=identity.sign(reserve_signed(greeting.relay_peer, greeting.nonce,
                                                                     identity.peer_id)))
            if credentials is not None:
                request.metadata.update(credentials.metadata("relay:reserve", audience=greeting.relay_peer,
                                                             digest=request_digest_of(greeting.nonce, request)))
            await send(connection, client_frame(request))
            reserved = await expect(connection, "reserved", relay.endpoint, "relay reservation")
        except BaseException:
            connection.close()
            raise
    return Connection(connection.sock), reserved  # without the handshake's stall timeout: keepalives set the pace

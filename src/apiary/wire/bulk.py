"""The bulk tensor transport: large tensors over a plain TCP connection at socket speed.

gRPC in Python moves bulk bytes at a fraction of what the socket can (see docs/benchmarks.md),
so apiary carries large tensors (averaging parts, state downloads) over a second port with a
minimal framing (`apiary.wire.framing`): a length-prefixed `BulkRequest` declaring the tensors,
then their raw bytes. The receiver checks every header against its limits before it allocates,
then receives straight into the tensors' final buffers; the sender writes straight from tensor
memory. Errors, deadlines, tracing and metrics follow the same rules as the gRPC services, and
so do the per-peer limits (`apiary.wire.limits`): connections per peer, request rate and
concurrency, and every frame and payload taken from the server's budget of bytes in flight
before it is allocated (a connection's reused buffer holds its share until it closes). In a
private run, every request frame carries the caller's token and signature (`apiary.wire.auth`,
covering the route, body and tensor headers), checked before any tensor byte is read; with TLS,
each connection is a TLS session whose server proves the expected peer id (`apiary.wire.tls`).
A relayed endpoint's connection is a circuit through its relay (`apiary.wire.relay`), with TLS
to the target over it as on a direct connection; once a direct connection to the target was
punched (`apiary.wire.relay.punch`), new connections take direct ones and idle relayed ones are let go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace

from apiary.wire.address import Endpoint
from apiary.wire.auth import CallCredentials, Gatekeeper
from apiary.wire.limits import STALLED, LimitExceeded, ServerLimits
from apiary.wire.errors import (
    DeadlineExceeded,
    PeerUnavailable,
    RequestError,
    WireError,
    error_from_status,
)
from apiary.wire.framing import MAGIC, Connection, check_headers, parse_request, listening_socket, signed_digest
from apiary.wire.identity import Identity
from apiary.wire.protos.relay_pb2 import BULK
from apiary.wire.protos.wire_pb2 import BulkReply, BulkRequest, TensorHeader
from apiary.wire.relay.punch import Puncher
from apiary.wire.relay.protocol import connect_tcp
from apiary.wire.rpc import decode
from apiary.wire.metrics import RpcMetrics
from apiary.wire.settings import WireSettings
from apiary.wire.tls import certified_peer_id, client_ssl_context, tls_failure
from apiary.wire.tracing import incoming_context, outgoing_metadata, span_attributes, tracer

logger = logging.getLogger(__name__)

_DRAIN_SECONDS = 1.0

Payload = tuple[TensorHeader, memoryview]


@dataclass
class BulkCall:
    """A request as a route handler sees it: its body, tensors (header and bytes), caller."""

    route: str
    body: bytes
    tensors: list[tuple[TensorHeader, bytearray | memoryview]]
    peer: str


@dataclass
class BulkAnswer:
    """What a route handler returns: a body and tensors to send back."""

    body: bytes = b""
    tensors: list[Payload] = field(default_factory=list)
    on_sent: Callable[[], None] | None = None  # called once the answer is written (or writing it failed)


Handler = Callable[[BulkCall], Awaitable[BulkAnswer]]


class BulkServer:
    """Serves bulk routes on `settings.listen_host:bulk_port` (0: any free port); `gate` checks
    the credentials of a private run's requests."""

    def __init__(self, settings: WireSettings, *, metrics: RpcMetrics | None = None, limits: ServerLimits | None = None,
                 gate: Gatekeeper | None = None):
        self.settings = settings
        self.metrics = metrics
        self.limits = limits or ServerLimits(settings)
        self.gate = gate
        self._tls: ssl.SSLContext | None = None
        self._routes: dict[str, tuple[Handler, bool]] = {}
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def add_route(self, route: str, handler: Handler, *, keeps_tensors: bool = True) -> None:
        """Serves `route` with `handler`. A handler that does not keep the request's tensors past
        its return (`keeps_tensors=False`) gets them in a per-connection buffer reused across
        requests, which spares the cost of touching fresh memory for every request."""
        self._routes[route] = (handler, keeps_tensors)

    async def start(self, *, tls: ssl.SSLContext | None = None) -> None:
        """Binds and starts accepting (TLS sessions with `tls`); raises OSError naming the address if binding fails."""
        self._tls = tls
        listener = listening_socket(Endpoint(self.settings.listen_host, self.settings.bulk_port), "bulk transfers", 128)
        self._listener = listener
        self._spawn(self._accept_loop(listener))

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the bulk server has not started")
        return self._listener.getsockname()[1]

    async def stop(self) -> None:
        """Stops accepting, cancels every connection task and waits for them."""
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
            sock, address = await loop.sock_accept(listener)
            self.serve_socket(sock, Endpoint(address[0], address[1]))

    def serve_socket(self, sock: socket.socket, peer: Endpoint) -> None:
        """Serves a connection from `peer` (its host bears the per-peer limits): one accepted here,
        or a relay's circuit (`apiary.wire.relay`, `peer` as the relay saw the dialer)."""
        connection = Connection(sock, self.limits.bytes_in_flight.for_peer(peer.host), self.settings.stream_stall_timeout)
        try:
            closed = self.limits.open_connection(peer.host)
        except LimitExceeded as e:
            self._spawn(self._refuse_connection(connection, e))
            return
        self._spawn(self._serve_connection(connection, peer.host, str(peer), closed))

    async def _refuse_connection(self, connection: Connection, refusal: LimitExceeded) -> None:
        try:
            await self._refuse(connection, refusal.code, str(refusal))
        except (ConnectionError, OSError):
            pass
        finally:
            connection.close()

    async def _serve_connection(self, connection: Connection, host: str, peer: str, closed: Callable[[], None]) -> None:
        try:
            if self._tls is not None:
                async with asyncio.timeout(self.settings.default_timeout):
                    await connection.start_tls(self._tls, server_side=True)
            if await connection.read_exactly(len(MAGIC)) != MAGIC:
                await self._refuse(connection, grpc.StatusCode.INVALID_ARGUMENT,
                                   "not an apiary bulk connection (bad preamble)")
                return
            while await connection.wait_readable(self.settings.bulk_idle_timeout):
                if not await self._serve_request(connection, host, peer):
                    break
        except TimeoutError:  # a peer that stalls mid-request (or in its TLS handshake) is cut off
            self.limits.count_refusal(STALLED)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass  # a TLS handshake that fails ends here too (ssl.SSLError is an OSError)
        finally:
            connection.close()
            closed()

    async def _serve_request(self, connection: Connection, host: str, peer: str) -> bool:
        """Serves one request; returns whether the connection can carry another."""
        try:
            done = self.limits.admit(host)
        except LimitExceeded as e:
            await self._refuse(connection, e.code, str(e))
            return False
        try:
            return await self._serve_admitted(connection, host, peer)
        finally:
            done()

    async def _serve_admitted(self, connection: Connection, host: str, peer: str) -> bool:
        budget, held = self.limits.bytes_in_flight.for_peer(host), 0
        try:
            try:
                request = parse_request(await connection.read_frame(self.settings.max_message_bytes), self.settings)
                if self.gate is not None:  # before a single tensor byte is read
                    self.gate.check(request.metadata.items(), f"bulk:{request.route}", signed_digest(request))
                if request.route not in self._routes:
                    raise _Refusal(grpc.StatusCode.UNIMPLEMENTED, f"no bulk route {request.route!r} on this peer")
                handler, keeps_tensors = self._routes[request.route]
                if keeps_tensors:  # otherwise the tensors land in the reused buffer, which reserves its own bytes
                    total = sum(header.nbytes for header in request.tensors)
                    budget.take(total, "a bulk request")
                    held = total
                tensors = await connection.read_payloads(request.tensors, scratch=not keeps_tensors)
            except RequestError as e:
                await self._refuse(connection, e.code, str(e))
                return False
            except _Refusal as e:
                await self._refuse(connection, e.code, e.details)
                return False
            reply, payloads, sent = await self._handle(handler, BulkCall(request.route, request.body, tensors, peer), request)
            try:
                await connection.write_frame(reply, payloads)
            finally:
                if sent is not None:
                    sent()
            return True
        finally:
            budget.give_back(held)

    async def _handle(self, handler: Handler, call: BulkCall, request: BulkRequest
                      ) -> tuple[BulkReply, list[memoryview], Callable[[], None] | None]:
        started, code = time.perf_counter(), grpc.StatusCode.OK
        with tracer.start_as_current_span(
            f"bulk {call.route}",
            context=incoming_context(request.metadata.items()),
            kind=trace.SpanKind.SERVER,
            attributes=span_attributes("bulk", call.route, call.peer),
        ) as span:
            try:
                answer = await handler(call)
                return (
                    BulkReply(code=0, body=answer.body, tensors=[header for header, _ in answer.tensors]),
                    [payload for _, payload in answer.tensors],
                    answer.on_sent,
                )
            except RequestError as e:
                code, details = e.code, str(e)
            except Exception as e:  # noqa: BLE001 - every failure becomes a status
                logger.exception("bulk route %s failed", call.route)
                code, details = grpc.StatusCode.INTERNAL, f"bulk route {call.route} failed: {type(e).__name__}: {e}"
            finally:
                if self.metrics is not None:
                    self.metrics.observe(call.route, code, time.perf_counter() - started)
            span.set_status(trace.Status(trace.StatusCode.ERROR, details))
            return BulkReply(code=code.value[0], details=details), [], None

    async def _refuse(self, connection: Connection, code: grpc.StatusCode, details: str) -> None:
        """Answers with an error, then discards what the peer still sends for a moment and closes."""
        await connection.write_frame(BulkReply(code=code.value[0], details=details))
        connection.sock.shutdown(socket.SHUT_WR)
        sink = bytearray(1 << 20)

        async def drain() -> None:
            while await connection.loop.sock_recv_into(connection.sock, sink):
                pass

        with contextlib.suppress(OSError, asyncio.TimeoutError):
            async with asyncio.timeout(_DRAIN_SECONDS):
                await drain()


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


_STATUS_BY_VALUE = {status.value[0]: status for status in grpc.StatusCode}


class BulkClient:
    """Calls bulk routes on other peers, reusing idle connections per endpoint. With TLS, a call
    that names the `peer_id` it expects is refused by any other; in a private run, `identity`
    signs every request."""

    def __init__(self, settings: WireSettings | None = None, *, identity: Identity | None = None,
                 max_idle_per_peer: int = 4, on_call: Callable[[int, int], None] | None = None,
                 puncher: Puncher | None = None):
        self.settings = settings or WireSettings()
        self.on_call = on_call  # told the tensor bytes sent and received of each completed call
        self.credentials = CallCredentials.for_run(self.settings.run_authority, self.settings.access_token, identity)
        self.max_idle_per_peer = max_idle_per_peer
        self._idle: dict[Endpoint, list[Connection]] = {}
        # relayed endpoints: direct connections punched in the background (a pool's puncher may be shared)
        self._own_puncher = puncher is None
        self.puncher = puncher or Puncher(self.credentials, timeout=self.settings.default_timeout,
                                          enabled=self.settings.relay_punch)
        self._relayed: weakref.WeakSet[Connection] = weakref.WeakSet()  # connections that are circuits

    async def call(
        self,
        endpoint: Endpoint,
        route: str,
        *,
        body: bytes = b"",
        tensors: Sequence[Payload] = (),
        timeout: float | None = None,
        reply_into: Sequence[memoryview] = (),
        peer_id: str | None = None,
    ) -> tuple[bytes, list[tuple[TensorHeader, bytearray | memoryview]]]:
        """Sends `tensors` to `route` at `endpoint`; returns the reply's body and tensors. Reply
        tensors whose size matches a buffer of `reply_into` are received straight into it."""
        timeout = timeout or self.settings.default_timeout
        name = f"bulk {route}"
        with tracer.start_as_current_span(name, kind=trace.SpanKind.CLIENT,
                                          attributes=span_attributes("bulk", route, str(endpoint))):
            request = BulkRequest(route=route, body=body, tensors=[h for h, _ in tensors],
                                  metadata=dict(outgoing_metadata()))
            try:
                exchange = self._exchange(endpoint, peer_id, request, [p for _, p in tensors], reply_into)
                async with asyncio.timeout(timeout):
                    reply = await exchange
            except WireError:  # the peer's own answer (its DeadlineExceeded too): pass it on as is
                raise
            except asyncio.TimeoutError:
                raise DeadlineExceeded(f"{name} on {endpoint} did not finish within {timeout:.1f}s",
                                       peer=str(endpoint), code=grpc.StatusCode.DEADLINE_EXCEEDED) from None
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:  # TlsError too
                raise PeerUnavailable(f"{name} on {endpoint} failed: {tls_failure(str(e)) or e}", peer=str(endpoint),
                                      code=grpc.StatusCode.UNAVAILABLE) from None
        if self.on_call is not None:
            self.on_call(sum(h.nbytes for h, _ in tensors), sum(h.nbytes for h, _ in reply[1]))
        return reply

    async def _exchange(
        self, endpoint: Endpoint, peer_id: str | None, request: BulkRequest, payloads: list[memoryview],
        reply_into: Sequence[memoryview],
    ) -> tuple[bytes, list[tuple[TensorHeader, bytearray | memoryview]]]:
        peer_id = peer_id or endpoint.target_peer or None  # a relayed endpoint names who answers there
        connection = await self._connect(endpoint, peer_id)
        reusable = False
        try:
            if self.credentials is not None:
                request.metadata.update(self.credentials.metadata(
                    f"bulk:{request.route}", audience=connection.peer_id or peer_id, digest=signed_digest(request)))
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # the reply says why
                await connection.write_frame(request, payloads)
            reply = decode(BulkReply, await connection.read_frame(self.settings.max_message_bytes))
            if reply.code != 0:
                code = _STATUS_BY_VALUE.get(reply.code, grpc.StatusCode.UNKNOWN)
                raise error_from_status(code, reply.details, peer=str(endpoint), method=f"bulk {request.route}")
            check_headers(reply.tensors, self.settings.max_tensor_bytes, self.settings.max_bytes_in_flight)
            tensors = await connection.read_payloads(reply.tensors, into=reply_into)
            reusable = True
            return reply.body, tensors
        except RequestError as e:
            raise PeerUnavailable(f"bulk {request.route} on {endpoint}: bad reply: {e}", peer=str(endpoint)) from None
        finally:
            self._release(endpoint, connection, reusable)

    async def _connect(self, endpoint: Endpoint, peer_id: str | None) -> Connection:
        idle = self._idle.get(endpoint)
        direct_ready = endpoint.relayed and self.puncher.ready(endpoint, BULK)
        while idle:
            connection = idle.pop()
            if (connection.idle_and_open() and (peer_id is None or connection.peer_id in (None, peer_id))
                    and not (direct_ready and connection in self._relayed)):
                return connection
            connection.close()  # the peer closed it (e.g. it restarted) while it sat idle, or it goes direct now
        relayed = False
        if endpoint.relayed:  # a direct connection punched before, else a circuit through the relay; then TLS
            sock, relayed = await self.puncher.dial(endpoint, BULK, timeout=self.settings.default_timeout)
        else:
            sock = await connect_tcp(endpoint)
        connection = Connection(sock)
        if relayed:
            self._relayed.add(connection)
        try:
            if self.settings.tls:
                tls = await connection.start_tls(client_ssl_context(), server_side=False)
                connection.peer_id = certified_peer_id(tls.peer_certificate(), peer_id)
            await connection.send(MAGIC)
        except BaseException:
            connection.close()
            raise
        return connection

    def _release(self, endpoint: Endpoint, connection: Connection, reusable: bool) -> None:
        idle = self._idle.setdefault(endpoint, [])
        if reusable and len(idle) < self.max_idle_per_peer:
            idle.append(connection)
        else:
            connection.close()

    async def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
        if self._own_puncher:
            await self.puncher.close()

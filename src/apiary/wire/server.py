"""The gRPC server every apiary service runs.

`RpcServer` hosts implementations of `ServiceSpec`s. For each call it decodes the request
(a malformed one is answered with INVALID_ARGUMENT naming the message type), opens a server
span whose parent is the caller's span, counts the call by method and status code, and turns
handler exceptions into gRPC statuses without ever stopping the server. Every call is first
admitted by the server's per-peer limits (`apiary.wire.limits`), shared with its bulk server,
then, in a private run, by its gatekeeper (`apiary.wire.auth`): token, signature, replay.
With `settings.tls`, both ports speak TLS with a certificate bound to the server's peer id
(`apiary.wire.tls`).

A client stream that goes `stream_stall_timeout` seconds without a message is aborted
(DEADLINE_EXCEEDED), giving its bytes in flight back. grpc.aio stops its whole server when one
hostile request breaks its serving loop (a `:path` that is not UTF-8 does, in grpcio 1.85): the
server notices, serves again on the same port within moments and counts it (`restarts`);
`serving` turns False only if it cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from apiary.wire.address import Endpoint, PeerAddress
from apiary.wire.auth import gatekeeper_for, request_digest
from apiary.wire.bulk import BulkServer
from apiary.wire.errors import RequestError
from apiary.wire.identity import Identity
from apiary.wire.limits import ServerLimits, StreamStalled, peer_key
from apiary.wire.metrics import RpcMetrics
from apiary.wire.probe import PROBE, SINK_ROUTE, ProbeService
from apiary.wire.relay.server import RelayServer
from apiary.wire.reachability import DIAL_BACK, NONCE_ROUTE, DialBacks
from apiary.wire.rpc import CallContext, Method, ServiceSpec, decode
from apiary.wire.settings import WireSettings
from apiary.wire.tls import ServerCertificate
from apiary.wire.tracing import incoming_context, span_attributes, tracer

logger = logging.getLogger(__name__)

RESTART_ATTEMPTS = 5  # binds tried, 0.1 s apart and doubling, before a stopped server is given up
_RESTART_BACKOFF = 0.1
_DRAIN_SECONDS = 1.0


class RpcServer:
    """A grpc.aio server bound to `settings.listen_host:port`, announcing `announced`.

    Every server hosts the probe service (`apiary.wire.probe`, with `apiary.wire.reachability`'s
    DialBack and Nonce) next to the services added, and, unless `settings.bulk` is off, a bulk
    tensor server (`apiary.wire.bulk`) beside it.
    """

    def __init__(
        self,
        settings: WireSettings,
        identity: Identity,
        *,
        registry: CollectorRegistry | None = None,
        metrics_prefix: str = "apiary_wire",
    ):
        self.settings = settings
        self.identity = identity
        self.metrics = RpcMetrics(registry, metrics_prefix) if registry is not None else None
        self.limits = ServerLimits(settings, registry=registry, prefix=metrics_prefix)
        self.gate = gatekeeper_for(settings.run_authority, identity, self.limits.count_refusal)
        self._server: grpc.aio.Server | None = None  # made at start: an unstarted one upsets grpc at exit
        self._handlers: list[grpc.GenericRpcHandler] = []
        self.bulk = BulkServer(settings, metrics=self.metrics, limits=self.limits, gate=self.gate) if settings.bulk else None
        self.relay = RelayServer(settings, identity, registry=registry, prefix=metrics_prefix) if settings.relay else None
        self.dial_backs = DialBacks(settings, identity)  # reachability checks: its own nonces, dial-backs for others
        self._bound_port: int | None = None
        self._certificate: ServerCertificate | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0  # times the gRPC server stopped without being asked and was started again
        self._announce: tuple[Endpoint, Endpoint | None] | None = None  # set by announce(): replaces the settings'
        self._probe: ProbeService | None = None

    def add_service(self, spec: ServiceSpec, implementation: object) -> None:
        """Serves `spec` with `implementation`, whose snake_case methods handle each RPC."""
        self._handlers.append(self._generic_handler(spec, implementation))

    def _generic_handler(self, spec: ServiceSpec, implementation: object) -> grpc.GenericRpcHandler:
        handlers = {}
        for method in spec.methods:
            handler = getattr(implementation, method.handler_name, None)
            if handler is None:
                raise TypeError(f"{type(implementation).__name__} lacks {method.handler_name}() for {spec.name}")
            handlers[method.name] = self._method_handler(spec, method, handler)
        return grpc.method_handlers_generic_handler(spec.name, handlers)

    async def start(self) -> None:
        """Binds the port and starts serving; raises OSError naming the address if binding fails."""
        self._certificate = ServerCertificate.for_identity(self.identity) if self.settings.tls else None
        if self.bulk is not None:  # bound first: a gRPC server that never started keeps its port bound
            await self.bulk.start(tls=self._certificate.ssl_context() if self._certificate is not None else None)
        try:
            self._server = await self._serve(self.settings.port)
        except OSError:
            if self.bulk is not None:
                await self.bulk.stop()
            raise
        if self.relay is not None:
            try:
                await self.relay.start()
            except OSError:
                if self.bulk is not None:
                    await self.bulk.stop()
                await self._server.stop(0)
                raise
        self._stopping = False
        self._supervisor = asyncio.create_task(self._supervise(), name=f"apiary-grpc-supervisor-{self.port}")

    async def _serve(self, port: int) -> grpc.aio.Server:
        """A started grpc.aio server on `port` (0: any free one) with every service; OSError if it cannot bind."""
        address = str(Endpoint(self.settings.listen_host, port))
        server = grpc.aio.server(options=self.settings.grpc_options(),
                                 maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs)
        try:
            if self._certificate is not None:
                bound = server.add_secure_port(address, self._certificate.grpc_credentials())
            else:
                bound = server.add_insecure_port(address)
            if bound == 0:
                raise RuntimeError("the address is in use or unavailable")
        except RuntimeError as e:
            raise OSError(f"cannot listen on {address}: {e}") from None
        self._bound_port = bound
        probe = self._probe = ProbeService(self.identity, self.announced, self.announced_bulk, self.settings,
                                           self.limits.bytes_in_flight)
        if self.bulk is not None:
            self.bulk.add_route(SINK_ROUTE, probe.bulk_sink, keeps_tensors=False)
            self.bulk.add_route(NONCE_ROUTE, self.dial_backs.bulk_nonce, keeps_tensors=False)
        probe_handler = self._generic_handler(PROBE, probe)  # made anew: a restart announces its new ports
        server.add_generic_rpc_handlers((*self._handlers, probe_handler, self._generic_handler(DIAL_BACK, self.dial_backs)))
        await server.start()
        return server

    async def _supervise(self) -> None:
        """Waits for the gRPC server to stop; if nobody asked it to, serves again on the same port."""
        while True:
            assert self._server is not None
            with contextlib.suppress(Exception):  # the exception that broke grpc's serving loop, logged by grpc
                # shielded: cancelling this supervisor must not cancel the future grpc's own shutdown awaits
                await asyncio.shield(self._server.wait_for_termination())
            if self._stopping:
                return
            self.restarts += 1
            logger.error("the gRPC server on port %d stopped without being asked (restart %d); serving again",
                         self.port, self.restarts)
            for attempt in range(RESTART_ATTEMPTS):
                try:
                    self._server = await self._serve(self.port)
                    break
                except Exception as e:  # noqa: BLE001 - the port taken, or grpc refusing: retried, then given up
                    logger.warning("restarting the gRPC server failed (attempt %d of %d): %s",
                                   attempt + 1, RESTART_ATTEMPTS, e)
                    await asyncio.sleep(_RESTART_BACKOFF * 2**attempt)
            else:
                logger.error("the gRPC server on port %d could not be restarted: it no longer serves", self.port)
                return

    @property
    def started(self) -> bool:
        """Whether `start()` succeeded and `stop()` was not called since."""
        return self._supervisor is not None and not self._stopping

    @property
    def serving(self) -> bool:
        """Whether the gRPC server serves, or is being restarted after it stopped unasked."""
        return self.started and self._supervisor is not None and not self._supervisor.done()

    async def stop(self, grace: float | None = None) -> None:
        """Stops accepting calls and gives in-flight calls `grace` seconds to finish."""
        if self._server is None:
            return
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self.relay is not None:
            await self.relay.stop()
        if self.bulk is not None:
            await self.bulk.stop()
        await self._server.stop(self.settings.shutdown_grace if grace is None else grace)

    @property
    def port(self) -> int:
        if self._bound_port is None:
            raise RuntimeError("the server has not started")
        return self._bound_port

    @property
    def local_endpoint(self) -> Endpoint:
        """An endpoint that reaches this server from the same host."""
        host = self.settings.listen_host
        return Endpoint("127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host, self.port)

    @property
    def announced(self) -> Endpoint:
        """The endpoint other peers should dial: the last `announce()`d one, else from the settings."""
        if self._announce is not None:
            return self._announce[0]
        return Endpoint(self.settings.resolved_announce_host(), self.settings.announce_port or self.port)

    @property
    def announced_bulk(self) -> Endpoint | None:
        """The endpoint other peers should dial for bulk transfers (None: no bulk server)."""
        if self.bulk is None:
            return None
        if self._announce is not None and self._announce[1] is not None:
            return self._announce[1]
        return Endpoint(self.settings.resolved_announce_host(), self.settings.announce_bulk_port or self.bulk.port)

    @property
    def relay_address(self) -> PeerAddress | None:
        """Where peers behind NAT reserve and dialers reach them: `peer_id@<announced host>:<relay port>`
        (None: this server offers no relay)."""
        if self.relay is None:
            return None
        host = self.settings.resolved_announce_host() if self.announced.relayed else self.announced.host
        return PeerAddress(Endpoint(host, self.settings.announce_relay_port or self.relay.port), self.identity.peer_id)

    def announce(self, grpc: Endpoint, bulk: Endpoint | None) -> None:
        """Announces `grpc` (and `bulk`, for the bulk server) from now on: what `announced` and
        `announced_bulk` return, and what Ping answers. Everything that publishes this server's
        address reads them at each publication, so the next one carries the new endpoints."""
        self._announce = (grpc, bulk)
        if self._probe is not None:
            self._probe.announced, self._probe.announced_bulk = self.announced, self.announced_bulk

    def _method_handler(self, spec: ServiceSpec, method: Method, handler: Callable[..., Any]) -> grpc.RpcMethodHandler:
        observe = self._observe
        received = self.metrics.received.labels(method.name).inc if self.metrics is not None else None
        sent = self.metrics.sent.labels(method.name).inc if self.metrics is not None else None

        def serialize(response: Any) -> bytes:
            data = response.SerializeToString()
            if sent is not None:
                sent(len(data))
            return data

        def count(raw: bytes) -> bytes:
            if received is not None:
                received(len(raw))
            return raw
        admit = self.limits.admit
        name = f"{spec.name}/{method.name}"
        path = spec.path(method)
        gate = self.gate

        def check_credentials(raw: Any, context: grpc.aio.ServicerContext) -> None:
            if gate is not None:  # a unary request's signature covers its bytes
                gate.check(context.invocation_metadata() or (), path,
                           b"" if method.client_streaming else request_digest(raw))

        stall = self.settings.stream_stall_timeout
        count_refusal = self.limits.count_refusal

        async def requests_of(raw_iterator: AsyncIterator[bytes]) -> AsyncIterator[Any]:
            iterator = aiter(raw_iterator)
            while True:
                try:
                    async with asyncio.timeout(stall):
                        raw = await anext(iterator)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    count_refusal(StreamStalled.reason)
                    raise StreamStalled(f"no {method.request.DESCRIPTOR.name} arrived for "
                                        f"stream_stall_timeout={stall:g} seconds") from None
                yield decode(method.request, count(raw))

        def request_of(raw: Any) -> Any:
            return requests_of(raw) if method.client_streaming else decode(method.request, count(raw))

        if method.server_streaming:

            async def serve_stream(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                started, code, details = time.perf_counter(), grpc.StatusCode.OK, None
                span = tracer.start_span(
                    name,
                    context=incoming_context(context.invocation_metadata()),
                    kind=trace.SpanKind.SERVER,
                    attributes=span_attributes(spec.name, method.name, context.peer()),
                )
                done = None
                try:
                    done = admit(peer_key(context.peer()))
                    check_credentials(raw, context)
                    async for response in handler(request_of(raw), CallContext(context)):
                        yield response
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except Exception as e:  # noqa: BLE001 - every failure becomes a status
                    code, details = _status_of(name, e, span)
                finally:
                    if done is not None:
                        done()
                    span.end()
                    observe(method.name, code, time.perf_counter() - started)
                if details is not None:  # aborted outside the except block: the abort must not chain (and
                    if method.client_streaming:  # keep alive) the failure, whose frames may hold a tensor
                        await _drain(raw)
                    await context.abort(code, details)

            factory = grpc.stream_stream_rpc_method_handler if method.client_streaming else grpc.unary_stream_rpc_method_handler
            return factory(serve_stream, request_deserializer=None, response_serializer=serialize)

        async def serve_unary(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            started, code, details = time.perf_counter(), grpc.StatusCode.OK, ""
            with tracer.start_as_current_span(
                name,
                context=incoming_context(context.invocation_metadata()),
                kind=trace.SpanKind.SERVER,
                attributes=span_attributes(spec.name, method.name, context.peer()),
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                done = None
                try:
                    done = admit(peer_key(context.peer()))
                    check_credentials(raw, context)
                    return await handler(request_of(raw), CallContext(context))
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except Exception as e:  # noqa: BLE001 - every failure becomes a status
                    code, details = _status_of(name, e, span)
                finally:
                    if done is not None:
                        done()
                    observe(method.name, code, time.perf_counter() - started)
            if method.client_streaming:  # reached only on failure; outside the except block, as above
                await _drain(raw)
            await context.abort(code, details)

        factory = grpc.stream_unary_rpc_method_handler if method.client_streaming else grpc.unary_unary_rpc_method_handler
        return factory(serve_unary, request_deserializer=None, response_serializer=serialize)

    def _observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.observe(method, code, seconds)


async def _drain(requests: AsyncIterator[bytes]) -> None:
    """Discards what a failed call's client still sends (for at most `_DRAIN_SECONDS`), so that
    the client, done writing, reads the status instead of a broken stream ("Internal error")."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(_DRAIN_SECONDS):
            async for _ in requests:
                pass


def _status_of(name: str, error: Exception, span: trace.Span) -> tuple[grpc.StatusCode, str]:
    """The status a handler's exception is answered with; unexpected ones are logged."""
    if isinstance(error, RequestError):
        code, details = error.code, str(error)
    else:
        logger.exception("%s failed", name)
        code, details = grpc.StatusCode.INTERNAL, f"{name} failed: {type(error).__name__}: {error}"
    span.set_status(trace.Status(trace.StatusCode.ERROR, details))
    return code, details

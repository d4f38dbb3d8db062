"""Calling other peers: one channel per peer, a deadline on every call, errors mapped.

`ChannelPool` keeps one gRPC channel per endpoint for the life of the process (or until
closed). `RpcClient` calls one service on one peer through the pool: every call gets a
deadline (the caller's, else the default), a client span whose context travels in the call's
metadata, and any failure is raised as a `WireError` subclass.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import Message
from opentelemetry import trace

from apiary.wire.address import Endpoint
from apiary.wire.errors import WireError, error_from_status
from apiary.wire.rpc import Method, ServiceSpec
from apiary.wire.settings import WireSettings
from apiary.wire.tracing import outgoing_metadata, span_attributes, tracer

Request = Message | AsyncIterable[Message]


class ChannelPool:
    """Reuses one insecure gRPC channel per endpoint."""

    def __init__(self, settings: WireSettings | None = None):
        self.settings = settings or WireSettings()
        self._channels: dict[Endpoint, grpc.aio.Channel] = {}

    def channel(self, endpoint: Endpoint) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = grpc.aio.insecure_channel(str(endpoint), options=self.settings.grpc_options())
            self._channels[endpoint] = channel
        return channel

    async def discard(self, endpoint: Endpoint) -> None:
        """Closes the channel to `endpoint` (e.g. a peer known to be gone)."""
        channel = self._channels.pop(endpoint, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> ChannelPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class RpcClient:
    """Calls the methods of `spec` on the peer at `endpoint`."""

    def __init__(self, pool: ChannelPool, spec: ServiceSpec, endpoint: Endpoint, *, timeout: float | None = None):
        self.pool = pool
        self.spec = spec
        self.endpoint = endpoint
        self.timeout = timeout or pool.settings.default_timeout

    async def call(self, method_name: str, request: Request, *, timeout: float | None = None) -> Any:
        """A unary-response call (the request may be a message or an async stream of them)."""
        method = self.spec.method(method_name)
        with self._span(method):
            try:
                return await self._multicallable(method)(
                    request, timeout=timeout or self.timeout, metadata=outgoing_metadata()
                )
            except grpc.aio.AioRpcError as e:
                raise self._error(method, e) from None

    async def stream(self, method_name: str, request: Request, *, timeout: float | None = None) -> AsyncIterator[Any]:
        """A streaming-response call: yields responses as they arrive; the deadline covers the whole stream."""
        method = self.spec.method(method_name)
        with self._span(method):
            call = self._multicallable(method)(request, timeout=timeout or self.timeout, metadata=outgoing_metadata())
            try:
                async for response in call:
                    yield response
            except grpc.aio.AioRpcError as e:
                raise self._error(method, e) from None
            finally:
                call.cancel()

    def _multicallable(self, method: Method) -> Any:
        channel = self.pool.channel(self.endpoint)
        kind = {
            (False, False): channel.unary_unary,
            (True, False): channel.stream_unary,
            (False, True): channel.unary_stream,
            (True, True): channel.stream_stream,
        }[(method.client_streaming, method.server_streaming)]
        return kind(
            self.spec.path(method),
            request_serializer=method.request.SerializeToString,
            response_deserializer=method.response.FromString,
        )

    def _span(self, method: Method) -> Any:
        return tracer.start_as_current_span(
            f"{self.spec.name}/{method.name}",
            kind=trace.SpanKind.CLIENT,
            attributes=span_attributes(self.spec.name, method.name, str(self.endpoint)),
        )

    def _error(self, method: Method, error: grpc.aio.AioRpcError) -> WireError:
        return error_from_status(
            error.code(), error.details() or "", peer=str(self.endpoint), method=f"{self.spec.name}/{method.name}"
        )

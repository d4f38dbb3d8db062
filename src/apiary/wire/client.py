"""Calling other peers: one channel per peer, a deadline on every call, errors mapped.

`ChannelPool` keeps one gRPC channel per endpoint, at most `max_channels` of them (dialling
one more closes the least recently used, once its calls end); a channel's connection closes
after `idle_connection_timeout` without a call and opens again at the next. `RpcClient` calls
one service on one peer through the pool: every call gets a deadline (the caller's, else the
default), a client span whose context travels in the call's metadata, and any failure is
raised as a `WireError` subclass.

With `WireSettings.tls`, channels to public services are TLS channels that only the expected
peer id can answer (`apiary.wire.tls`): the id given to `RpcClient`, else the one the server
proves at first contact. In a private run (`run_authority`), every call to a public service
carries this peer's token and a fresh signature for its callee's peer id (`apiary.wire.auth`);
without TLS the callee's id cannot be proven, so it must be given (`peer_id@host:port`). Local
services (`ServiceSpec.local`) are always called in plaintext and without credentials.

A pool holds what a process dials with: its wire settings, identity and credentials. Objects
that dial take a pool, by default one made like the server they are attached to
(`ChannelPool.like(server)`), and `check_matches` refuses a pool that disagrees with the server
(TLS or plaintext, which run). A call that fails because the peer speaks the other protocol
fails with an error naming both sides.

A relayed endpoint's channel connects to a forwarder owned by the pool, which opens a circuit
through the relay for each connection (`apiary.wire.relay`); with TLS the channel is bound to
the endpoint's target peer id, so the relay carries ciphertext it cannot answer for.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message
from opentelemetry import trace

from apiary.wire.address import Endpoint
from apiary.wire.auth import CallCredentials, request_digest
from apiary.wire.errors import RequestRejected, WireError, error_from_status
from apiary.wire.identity import Identity
from apiary.wire.protos.relay_pb2 import GRPC
from apiary.wire.relay.forward import Forwarder
from apiary.wire.relay.punch import Puncher
from apiary.wire.rpc import Method, ServiceSpec
from apiary.wire.settings import WireSettings
from apiary.wire.tls import TlsError, fetch_peer_id, grpc_channel_credentials, plaintext_failure, tls_failure
from apiary.wire.tracing import outgoing_metadata, span_attributes, tracer

if TYPE_CHECKING:
    from apiary.wire.server import RpcServer

Request = Message | AsyncIterable[Message]


class ChannelPool:
    """Reuses one gRPC channel per endpoint (per endpoint and peer id with TLS).

    `identity` signs the calls of a private run (`settings.run_authority`); the pool fails at
    once (CredentialsError) if the token is missing, expired or not this identity's."""

    def __init__(self, settings: WireSettings | None = None, *, identity: Identity | None = None):
        self.settings = settings or WireSettings()
        self.identity = identity
        self.credentials = CallCredentials.for_run(self.settings.run_authority, self.settings.access_token, identity)
        self._channels: dict[tuple[Endpoint, str | None], grpc.aio.Channel] = {}
        self._proven: dict[Endpoint, str] = {}  # TLS: the ids servers proved at addresses dialled without one
        self._forwarders: dict[Endpoint, Forwarder] = {}  # relayed endpoints: where their channels connect
        self._folder: Path | None = None  # the forwarders' sockets
        # relayed endpoints: direct connections punched in the background; a channel moves to one when it is ready
        self.puncher = Puncher(self.credentials, timeout=self.settings.default_timeout,
                               enabled=self.settings.relay_punch)
        self.puncher.on_direct(self._upgrade)
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}  # replaced channels, closing with grace

    @classmethod
    def like(cls, server: RpcServer) -> ChannelPool:
        """A pool that dials as `server` serves: its settings (TLS or plaintext, run, token) and identity."""
        return cls(server.settings, identity=server.identity)

    def copy(self) -> ChannelPool:
        """A pool with the same settings and credentials and channels of its own (for another
        event loop: gRPC channels belong to the loop that made them)."""
        return ChannelPool(self.settings, identity=self.identity)

    def check_matches(self, served: WireSettings, user: str) -> None:
        """SettingsMismatch, naming both sides, unless this pool dials as `served` serves: with TLS
        or plaintext alike, in the same run. `user` names what dials with this pool."""
        dials, serves = _transport(self.settings), _transport(served)
        if dials != serves:
            raise SettingsMismatch(f"{user} dials {dials} but its server serves {serves}: give it a pool made "
                                   f"with the server's wire settings (ChannelPool.like(server))")
        if self.settings.run_authority != served.run_authority:
            raise SettingsMismatch(f"{user} dials {_run(self.settings)} but its server serves {_run(served)}: give it "
                                   f"a pool made with the server's wire settings (ChannelPool.like(server))")

    def channel(self, endpoint: Endpoint, peer_id: str | None = None, *, local: bool = False) -> grpc.aio.Channel:
        """The channel to `endpoint`: plaintext, or (TLS, not `local`) one that only `peer_id` can answer."""
        tls = self.settings.tls and not local
        if endpoint.relayed:  # the relay splices to its target: no other peer can be expected there
            if peer_id not in (None, endpoint.target_peer):
                raise ValueError(f"{endpoint} reaches peer {endpoint.target_peer}, not {peer_id}")
            peer_id = endpoint.target_peer
        if tls and peer_id is None:
            raise ValueError(f"a TLS channel to {endpoint} needs the peer id expected there (see `connect`)")
        key = (endpoint, peer_id if tls else None)
        channel = self._channels.pop(key, None)
        if channel is not None:
            self._channels[key] = channel  # now the most recently used
        else:
            target = self._forwarder(endpoint).target if endpoint.relayed else str(endpoint)
            if tls:
                assert peer_id is not None
                credentials, options = grpc_channel_credentials(peer_id)
                channel = grpc.aio.secure_channel(target, credentials,
                                                  options=[*self.settings.grpc_options(), *options])
            else:
                channel = grpc.aio.insecure_channel(target, options=self.settings.grpc_options())
            self._channels[key] = channel
            if len(self._channels) > self.settings.max_channels:
                self._retire(self._channels.pop(next(iter(self._channels))))  # the least recently used
        return channel

    @property
    def open_channels(self) -> int:
        """Channels this pool keeps now (retiring ones aside)."""
        return len(self._channels)

    async def connect(self, endpoint: Endpoint, peer_id: str | None, *, local: bool, timeout: float,
                      method: str = "connecting") -> tuple[grpc.aio.Channel, str | None]:
        """The channel for a call (to `method`, named in errors) and the peer id it is bound to (None:
        plaintext, id unknown). With TLS and no `peer_id`, the id is the one the server proves at first contact
        (a relayed endpoint's, its target)."""
        if endpoint.relayed:
            peer_id = peer_id or endpoint.target_peer
        if self.settings.tls and not local and peer_id is None:
            peer_id = self._proven.get(endpoint)
            if peer_id is None:
                try:
                    peer_id = self._proven[endpoint] = await fetch_peer_id(endpoint, timeout)
                except TimeoutError as e:
                    raise error_from_status(grpc.StatusCode.DEADLINE_EXCEEDED, f"TLS handshake: {e}",
                                            peer=str(endpoint), method=method) from None
                except (TlsError, OSError) as e:
                    raise error_from_status(grpc.StatusCode.UNAVAILABLE, tls_failure(str(e)) or f"TLS handshake: {e}",
                                            peer=str(endpoint), method=method) from None
        bound = peer_id if self.settings.tls and not local else None
        return self.channel(endpoint, peer_id, local=local), bound

    def _forwarder(self, endpoint: Endpoint) -> Forwarder:
        """The forwarder of a relayed endpoint (made at first use, closed with the pool)."""
        forwarder = self._forwarders.get(endpoint)
        if forwarder is None:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="apiary-relay-"))  # mode 0700: this user's only
            forwarder = self._forwarders[endpoint] = Forwarder(
                endpoint, self._folder, credentials=self.credentials, timeout=self.settings.default_timeout,
                idle_timeout=self.settings.relay_idle_timeout, puncher=self.puncher)
        return forwarder

    def _upgrade(self, endpoint: Endpoint, kind: int) -> None:
        """A direct connection to the target of `endpoint` is ready: its channels are replaced (the
        new ones connect at once and take it), the old ones close once their calls end (at most a
        default timeout)."""
        if kind != GRPC:
            return
        for key in [key for key in self._channels if key[0] == endpoint]:
            self._retire(self._channels.pop(key))
            self.channel(endpoint, key[1]).get_state(try_to_connect=True)

    def _retire(self, channel: grpc.aio.Channel) -> None:
        """Closes a replaced channel once its calls end (at most a default timeout later)."""
        task = asyncio.ensure_future(channel.close(self.settings.default_timeout))
        self._retiring[task] = channel
        task.add_done_callback(lambda done: self._retiring.pop(done, None))

    def relay_failure(self, endpoint: Endpoint) -> WireError | None:
        """Why the latest circuit to a relayed endpoint could not be opened (None: it could, or none was tried)."""
        forwarder = self._forwarders.get(endpoint)
        return forwarder.failure() if forwarder is not None else None

    def forget(self, endpoint: Endpoint) -> None:
        """Forgets the id proven at `endpoint` (e.g. the peer there restarted with another one)."""
        self._proven.pop(endpoint, None)

    async def discard(self, endpoint: Endpoint) -> None:
        """Replaces the channels to `endpoint` (e.g. a peer known to be gone, or back after its
        calls failed): the next call dials afresh; the calls in flight on the old ones end on
        their own, which then close (a call failed by a channel closed under it would count
        against a peer that answers)."""
        self.forget(endpoint)
        for key in [key for key in self._channels if key[0] == endpoint]:
            self._retire(self._channels.pop(key))
        if endpoint in self._forwarders:
            await self._forwarders.pop(endpoint).close()

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
        retiring, self._retiring = dict(self._retiring), {}
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        for channel in retiring.values():
            await channel.close()
        await self.puncher.close()
        forwarders, self._forwarders = list(self._forwarders.values()), {}
        for forwarder in forwarders:
            await forwarder.close()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    async def __aenter__(self) -> ChannelPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class SettingsMismatch(ValueError):
    """What a process dials with disagrees with what it serves."""


def _transport(settings: WireSettings) -> str:
    return "with TLS" if settings.tls else "in plaintext"


def _run(settings: WireSettings) -> str:
    return f"in private run {settings.run_authority}" if settings.run_authority else "in an open run"


class RpcClient:
    """Calls the methods of `spec` on the peer at `endpoint` (with TLS: the peer `peer_id`, if given)."""

    def __init__(self, pool: ChannelPool, spec: ServiceSpec, endpoint: Endpoint, *, timeout: float | None = None,
                 peer_id: str | None = None):
        self.pool = pool
        self.spec = spec
        self.endpoint = endpoint
        self.peer_id = peer_id
        self.timeout = timeout or pool.settings.default_timeout

    async def call(self, method_name: str, request: Request, *, timeout: float | None = None) -> Any:
        """A unary-response call (the request may be a message or an async stream of them)."""
        method = self.spec.method(method_name)
        timeout = timeout or self.timeout
        with self._span(method):
            multicallable, request, metadata = await self._prepare(method, request, timeout)
            try:
                return await multicallable(request, timeout=timeout, metadata=metadata)
            except grpc.aio.AioRpcError as e:
                raise await self._error(method, e) from None

    async def stream(self, method_name: str, request: Request, *, timeout: float | None = None) -> AsyncIterator[Any]:
        """A streaming-response call: yields responses as they arrive; the deadline covers the whole stream."""
        method = self.spec.method(method_name)
        timeout = timeout or self.timeout
        with self._span(method):
            multicallable, request, metadata = await self._prepare(method, request, timeout)
            call = multicallable(request, timeout=timeout, metadata=metadata)
            try:
                async for response in call:
                    yield response
            except grpc.aio.AioRpcError as e:
                raise await self._error(method, e) from None
            finally:
                call.cancel()

    async def _prepare(self, method: Method, request: Request, timeout: float) -> tuple[Any, Request | bytes, Any]:
        """The multicallable, the request (serialized here when a signature covers its digest) and the metadata."""
        local = self.spec.local
        channel, peer_id = await self.pool.connect(self.endpoint, self.peer_id, local=local, timeout=timeout,
                                                   method=f"{self.spec.name}/{method.name}")
        credentials = None if local else self.pool.credentials
        serializer: Any = method.request.SerializeToString
        extra: list[tuple[str, str]] = []
        if credentials is not None:
            audience = peer_id or self.peer_id
            if not audience:  # plaintext: nothing proves who answers at the address
                raise RequestRejected(
                    f"{self.spec.name}/{method.name} on {self.endpoint}: a call in a private run is signed for its "
                    f"callee, whose peer id is unknown here; without TLS it cannot be proven, so dial "
                    f"<peer_id>@{self.endpoint}", peer=str(self.endpoint))
            digest = b""
            if isinstance(request, Message):  # a unary request: serialized once, here, and signed
                request = request.SerializeToString()
                digest, serializer = request_digest(request), None
            extra = credentials.metadata(self.spec.path(method), audience=audience, digest=digest)
        kind = {
            (False, False): channel.unary_unary,
            (True, False): channel.stream_unary,
            (False, True): channel.unary_stream,
            (True, True): channel.stream_stream,
        }[(method.client_streaming, method.server_streaming)]
        multicallable = kind(self.spec.path(method), request_serializer=serializer,
                             response_deserializer=method.response.FromString)
        return multicallable, request, outgoing_metadata(extra)

    def _span(self, method: Method) -> Any:
        return tracer.start_as_current_span(
            f"{self.spec.name}/{method.name}",
            kind=trace.SpanKind.CLIENT,
            attributes=span_attributes(self.spec.name, method.name, str(self.endpoint)),
        )

    async def _error(self, method: Method, error: grpc.aio.AioRpcError) -> WireError:
        details = error.details() or ""
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            failure = self.pool.relay_failure(self.endpoint) if self.endpoint.relayed else None
            if failure is not None:  # the relay refused the circuit, or could not be reached: say why
                return type(failure)(f"{self.spec.name}/{method.name} on {self.endpoint} failed: {failure}",
                                     peer=str(self.endpoint), code=failure.code)
            if "handshake failed" in details.lower() and self.pool.settings.tls and not self.spec.local:
                expected = self.peer_id or self.endpoint.target_peer or "the id it proved before"
                details = tls_failure(details) or f"the server did not prove peer id {expected} over TLS ({details})"
            elif not self.pool.settings.tls and not self.spec.local and not self.endpoint.relayed:
                details = await plaintext_failure(self.endpoint, details) or details
            if self.peer_id is None:
                self.pool.forget(self.endpoint)  # whoever answers there next proves its id afresh
        return error_from_status(error.code(), details, peer=str(self.endpoint), method=f"{self.spec.name}/{method.name}")

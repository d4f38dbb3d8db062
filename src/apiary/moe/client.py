"""Remote experts as torch modules.

`RemoteExpert(endpoint, name)` behaves like the expert's module: its forward calls the
server's Forward, and autograd's backward through it calls the server's Backward, which
returns the gradient of the inputs (and trains the remote expert by one step).

Autograd calls backward synchronously, from whatever thread runs it, so every remote call
runs on one background event loop per process (`background_loop()`, a daemon thread) and the
caller waits for it with a deadline. The client's gRPC channels live on that loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from apiary.moe.experts import DTYPES
from apiary.moe.protos.moe_pb2 import ExpertRequest, InfoReply, InfoRequest
from apiary.moe.server import EXPERTS_SERVICE
from apiary.wire import (
    ChannelPool,
    DeadlineExceeded,
    Endpoint,
    InvalidRequest,
    PayloadTooLarge,
    PeerAddress,
    RemoteFailure,
    RpcClient,
)
from apiary.wire.tensors import deserialize_tensor, serialize_tensor

T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()
_shared_pool: ChannelPool | None = None  # used on the background loop only


def background_loop() -> asyncio.AbstractEventLoop:
    """This process's event loop for remote expert calls, started on first use."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="apiary-moe-client", daemon=True).start()
            _loop = loop
        return _loop


def shared_pool() -> ChannelPool:
    """The process's channel pool for expert calls; use it on `background_loop()` only."""
    global _shared_pool
    if _shared_pool is None:
        _shared_pool = ChannelPool()
    return _shared_pool


def run_sync(coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
    """Runs `coroutine` on the background loop and waits at most `timeout` seconds for it
    (e.g. `run_sync(DHTNode.launch(peers), 30)` makes a DHT node that remote layers can use)."""
    loop = background_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coroutine.close()
        raise RuntimeError("a remote expert's synchronous call was made from its own background loop")
    future = asyncio.run_coroutine_threadsafe(coroutine, loop)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise DeadlineExceeded(f"the remote expert call took more than {timeout:.1f} s") from None


class RemoteExpert(nn.Module):
    """An expert hosted by the server at `endpoint`, usable as a module.

    `endpoint` is the server's address as its expert declarations name it, `peer_id@host:port`
    (or `host:port`, where TLS proves the id at first contact). Every RemoteExpert of the process
    shares one channel per server unless given `pool` (e.g. one that dials in plaintext, or with
    a private run's token), which must then only be used from `background_loop()` (gRPC channels
    belong to one loop). Activations and gradients travel in `dtype` (None: the expert's compute
    dtype, asked once with Info; bfloat16 or float16 halve the bytes) and come back in the
    caller's dtype. With
    `keep_activations` (the default), a forward pass that will be followed by a backward asks
    the server to keep its activations, so that the backward does not recompute them.
    """

    def __init__(self, endpoint: PeerAddress | Endpoint | str, name: str, pool: ChannelPool | None = None, *,
                 timeout: float = 30.0, max_tensor_bytes: int = 1 << 30, keep_activations: bool = True,
                 dtype: torch.dtype | None = torch.float32):
        super().__init__()
        address = PeerAddress.parse(endpoint) if isinstance(endpoint, str) else endpoint
        if isinstance(address, Endpoint):
            address = PeerAddress(address)
        self.endpoint = address.endpoint
        self.peer_id = address.peer_id
        self.name = name
        self.timeout = timeout
        self.keep_activations = keep_activations
        self.max_tensor_bytes = max_tensor_bytes
        self.dtype = dtype
        self.bytes_sent = 0  # serialized requests and replies of Forward and Backward
        self.bytes_received = 0
        self._pool = pool
        self._rpc: RpcClient | None = None

    def _client(self) -> RpcClient:  # made on the background loop
        if self._rpc is None:
            if self._pool is None:
                self._pool = shared_pool()
            self._rpc = RpcClient(self._pool, EXPERTS_SERVICE, self.endpoint, timeout=self.timeout,
                                  peer_id=self.peer_id)
        return self._rpc

    async def call_async(self, method: str, tensors: Sequence[torch.Tensor], *, keep_activations: bool = False,
                         handle: bytes = b"", keywords: Sequence[str] = ()) -> tuple[list[torch.Tensor], bytes]:
        """Forward or Backward on the server (run this on `background_loop()`): the result
        tensors and, for a Forward asked to keep its activations, the handle a Backward sends back.
        `keywords` names the last inputs, passed by keyword."""
        request = ExpertRequest(expert=self.name, tensors=[serialize_tensor(t.detach().cpu()) for t in tensors],
                                keep_activations=keep_activations, handle=handle, keywords=keywords)
        reply = await self._client().call(method, request, timeout=self.timeout)
        self.bytes_sent += request.ByteSize()
        self.bytes_received += reply.ByteSize()
        try:
            return [deserialize_tensor(message, self.max_tensor_bytes) for message in reply.tensors], reply.handle
        except (InvalidRequest, PayloadTooLarge) as e:  # what deserialize_tensor refuses
            raise RemoteFailure(f"{method} of expert {self.name!r} on {self.endpoint} answered a malformed tensor: {e}",
                                peer=str(self.endpoint)) from None

    def call(self, method: str, tensors: Sequence[torch.Tensor], keywords: Sequence[str] = ()) -> list[torch.Tensor]:
        """Forward or Backward on the server, from any thread but the background loop's."""
        return run_sync(self.call_async(method, tensors, keywords=keywords), self.timeout + 1.0)[0]

    def info(self) -> InfoReply:
        async def ask() -> InfoReply:
            return await self._client().call("Info", InfoRequest(expert=self.name), timeout=self.timeout)

        return run_sync(ask(), self.timeout + 1.0)

    def wire_dtype(self) -> torch.dtype:
        """The dtype tensors travel in: `dtype`, or the expert's schema's (asked once)."""
        if self.dtype is None:
            self.dtype = DTYPES[self.info().dtype or "float32"]
        return self.dtype

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The expert's outputs (one tensor, or a tuple of several) for its positional and keyword
        inputs; gradients flow back to every float input that requires them."""
        inputs = [*args, *kwargs.values()]
        keep = self.keep_activations and torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        outputs = _RemoteCall.apply(self, keep, tuple(kwargs), *inputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def extra_repr(self) -> str:
        return f"endpoint={self.endpoint}, name={self.name!r}"


class _RemoteCall(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, expert: RemoteExpert, keep: bool, keywords: tuple[str, ...],  # type: ignore[override]
                *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        wire = expert.wire_dtype()
        outputs, handle = run_sync(expert.call_async("Forward", _to_wire(inputs, wire), keep_activations=keep,
                                                     keywords=keywords), expert.timeout + 1.0)
        if not outputs:
            raise RemoteFailure(f"Forward of expert {expert.name!r} on {expert.endpoint} answered no tensor",
                                peer=str(expert.endpoint))
        ctx.expert, ctx.handle, ctx.keywords = expert, handle, keywords
        ctx.save_for_backward(*inputs)
        like = next((t for t in inputs if t.is_floating_point()), inputs[0])
        answered = tuple(o.to(like.device, like.dtype) if o.is_floating_point() else o.to(like.device)
                         for o in outputs)
        ctx.mark_non_differentiable(*(o for o in answered if not o.is_floating_point()))
        return answered

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        inputs = ctx.saved_tensors
        expert: RemoteExpert = ctx.expert
        wire = expert.wire_dtype()
        grads, _ = run_sync(expert.call_async("Backward", _to_wire([*inputs, *grad_outputs], wire), handle=ctx.handle,
                                              keywords=ctx.keywords), expert.timeout + 1.0)
        if len(grads) != len(inputs):
            raise RemoteFailure(f"Backward of expert {expert.name!r} on {expert.endpoint} answered {len(grads)} "
                                f"tensors, expected {len(inputs)}", peer=str(expert.endpoint))
        return None, None, None, *(g.to(x.device, x.dtype) if x.is_floating_point() else None
                                   for g, x in zip(grads, inputs))


def _to_wire(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The float tensors in the wire's dtype; the others as they are."""
    return [t.to(dtype) if t.is_floating_point() else t for t in tensors]

"""The expert server's gRPC service: Forward, Backward, ForwardMany, BackwardMany and Info.

`ExpertServer` holds the experts and the batching runtime and serves `EXPERTS_SERVICE` on an
`RpcServer` (`attach`). Every request is checked before it joins a batch (known expert; its
inputs, positional and keyword, against the expert's schema: count, names, dtypes, shapes, one
batch size for all; not too many samples), so one bad request never fails other callers' batch; a refused
request gets INVALID_ARGUMENT, NOT_FOUND or RESOURCE_EXHAUSTED with a message naming the
expert and what is wrong, and the server keeps serving. A tensor holding a NaN or an infinity
is refused, received or about to be sent (`apiary.moe.finite`): no caller can poison an
expert's weights or get a non-finite answer. Requests share a batch only with requests of the
same keywords, dtypes and shapes past dim 0. ForwardMany and BackwardMany carry one
request per expert in a single call; each request succeeds or fails on its own. A Forward that
asks to keep its activations runs as a batch of its own and answers a handle; the Backward that
brings the handle back reuses them (`apiary.moe.activations`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable

import grpc
import torch

from apiary.moe.activations import ActivationCache
from apiary.moe.batching import BatchingRuntime, BatchStats, BatchTooLarge, QueueFull
from apiary.moe.checkpoints import load_checkpoints, save_checkpoints
from apiary.moe.experts import Expert
from apiary.moe.finite import all_finite
from apiary.moe.metrics import ExpertServerMetrics
from apiary.moe.protos.moe_pb2 import (
    ExpertCalls,
    ExpertRequest,
    ExpertResponse,
    ExpertResult,
    ExpertResults,
    InfoReply,
    InfoRequest,
)
from apiary.wire import (Busy, CallContext, InvalidRequest, Method, NotFoundHere, PayloadTooLarge, RequestError, RpcServer,
                         ServiceSpec)
from apiary.wire.tensors import deserialize_tensor, serialize_tensor

EXPERTS_SERVICE = ServiceSpec(
    "apiary.moe.Experts",
    (
        Method("Forward", ExpertRequest, ExpertResponse),
        Method("Backward", ExpertRequest, ExpertResponse),
        Method("ForwardMany", ExpertCalls, ExpertResults),
        Method("BackwardMany", ExpertCalls, ExpertResults),
        Method("Info", InfoRequest, InfoReply),
    ),
)

MAX_TENSORS_PER_REQUEST = 16
MAX_CALLS_PER_REQUEST = 4096


class UnknownExpert(NotFoundHere):
    """No expert of that name is hosted here: NOT_FOUND."""


def status_name(error: BaseException | None) -> str:
    """How a request ended, as the metrics label it: "ok" or the gRPC code's name, lower case."""
    if error is None:
        return "ok"
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    if isinstance(error, RequestError):
        return error.code.name.lower()
    return "internal"


class ExpertServer:
    """Hosts experts behind one batching runtime. `await start()` before serving, `close()` after;
    experts chosen later (`host`) join before `start()`."""

    def __init__(self, experts: Iterable[Expert], runtime: BatchingRuntime | None = None, *,
                 max_tensor_bytes: int = 1 << 30, checkpoint_dir: str | os.PathLike[str] | None = None,
                 checkpoint_period: float = 300.0, metrics: ExpertServerMetrics | None = None,
                 activations: ActivationCache | None = None):
        self.experts: dict[str, Expert] = {}
        self.runtime = runtime or BatchingRuntime()
        self.max_tensor_bytes = max_tensor_bytes
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_period = checkpoint_period
        self.metrics = metrics
        self.activations = activations if activations is not None else ActivationCache()
        if metrics is not None:
            metrics.count_skipped_updates(self.experts.values())
            self.runtime.observer = metrics.batch
        self._checkpointing: asyncio.Task[None] | None = None
        self.host(experts)

    def host(self, experts: Iterable[Expert]) -> None:
        """Adds experts to those hosted (ValueError if a name is taken)."""
        for expert in experts:
            if expert.name in self.experts:
                raise ValueError(f"two experts are named {expert.name!r}")
            self.experts[expert.name] = expert
        if self.metrics is not None:
            self.metrics.experts.set(len(self.experts))
            self.metrics.hosting({expert.spec.kind for expert in self.experts.values()})

    def attach(self, rpc_server: RpcServer) -> None:
        rpc_server.add_service(EXPERTS_SERVICE, self)

    async def start(self) -> None:
        """Restores the experts from their checkpoints (if any), then starts serving and saving."""
        if self.checkpoint_dir is not None:
            await asyncio.to_thread(load_checkpoints, self.experts, self.checkpoint_dir)
            self._checkpointing = asyncio.create_task(self._checkpoint_loop())
        self.runtime.start()

    async def close(self) -> None:
        """Stops serving, then saves every expert's checkpoint one last time."""
        await self.runtime.shutdown()
        if self._checkpointing is not None:
            self._checkpointing.cancel()
            await asyncio.gather(self._checkpointing, return_exceptions=True)
            await asyncio.to_thread(save_checkpoints, self.experts, self.checkpoint_dir)

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.checkpoint_period)
            await asyncio.to_thread(save_checkpoints, self.experts, self.checkpoint_dir)

    # ---- handlers

    async def forward(self, request: ExpertRequest, context: CallContext) -> ExpertResponse:
        tensors, handle = await self._counted("forward", request, self._forward)
        return ExpertResponse(tensors=tensors, handle=handle)

    async def backward(self, request: ExpertRequest, context: CallContext) -> ExpertResponse:
        tensors, _ = await self._counted("backward", request, self._backward)
        return ExpertResponse(tensors=tensors)

    async def forward_many(self, request: ExpertCalls, context: CallContext) -> ExpertResults:
        return await self._many("forward", request, self._forward)

    async def backward_many(self, request: ExpertCalls, context: CallContext) -> ExpertResults:
        return await self._many("backward", request, self._backward)

    async def info(self, request: InfoRequest, context: CallContext) -> InfoReply:
        hosted = self.experts.get(request.expert)
        self._count(hosted, "info", None if hosted is not None else UnknownExpert())
        expert = self._expert(request.expert)
        forward = self.runtime.stats.get((expert.name, "forward"), BatchStats())
        backward = self.runtime.stats.get((expert.name, "backward"), BatchStats())
        inputs, outputs = expert.schema.to_messages(expert.spec.dtype)
        return InfoReply(
            name=expert.name, kind=expert.spec.kind, hidden_size=expert.spec.hidden_size, dtype=expert.spec.dtype,
            inputs=inputs, outputs=outputs,
            max_batch_size=self.runtime.max_batch_size,
            forward_batches=forward.batches, forward_requests=forward.requests,
            backward_batches=backward.batches, backward_requests=backward.requests,
            updates=expert.updates,
        )

    # ---- one request

    async def _forward(self, request: ExpertRequest) -> tuple[list[torch.Tensor], bytes]:
        expert = self._expert(request.expert)
        inputs, keywords = self._tensors(request), tuple(request.keywords)
        self._check(lambda: expert.check_inputs(inputs, keywords))
        _refuse_non_finite(expert, "Forward", _named("input", inputs, keywords))
        if not (request.keep_activations and self.activations.enabled):
            outputs = await self._submit(expert, "forward", lambda joined: expert.forward(joined, keywords), inputs,
                                         keywords)
            handle = b""
        else:
            handle = self.activations.new_handle()

            def forward_keeping(joined: list[torch.Tensor]) -> list[torch.Tensor]:
                outputs, kept = expert.forward_keeping(joined, keywords)
                self.activations.put(expert.name, handle, kept)
                return outputs

            outputs = await self._submit(expert, "forward", forward_keeping, inputs, keywords, alone=True)
        _refuse_non_finite(expert, "Forward", _named("output", outputs), overflowed=True)
        return outputs, handle

    async def _backward(self, request: ExpertRequest) -> tuple[list[torch.Tensor], bytes]:
        expert = self._expert(request.expert)
        tensors, keywords = self._tensors(request), tuple(request.keywords)
        outputs = len(expert.schema.outputs)
        if len(tensors) <= outputs:
            raise InvalidRequest(f"expert {expert.name!r}: Backward takes the inputs, then the gradients of the "
                                 f"{outputs} output{'s' if outputs > 1 else ''}; got {len(tensors)} tensors")
        inputs, grad_outputs = tensors[:-outputs], tensors[-outputs:]
        self._check(lambda: expert.check_grad_outputs(inputs, grad_outputs, keywords))
        _refuse_non_finite(expert, "Backward", {**_named("input", inputs, keywords),
                                                **_named("output gradient", grad_outputs)})
        kept = self.activations.pop(expert.name, request.handle) if request.handle else None
        count = len(inputs)
        grads = await self._submit(
            expert, "backward", lambda joined: expert.backward(joined[:count], joined[count:], kept, keywords),
            tensors, keywords, alone=kept is not None)
        _refuse_non_finite(expert, "Backward", _named("input gradient", grads, keywords), overflowed=True)
        return grads, b""

    async def _counted(self, method: str, request: ExpertRequest, serve: Callable) -> tuple[list, bytes]:  # type: ignore[type-arg]
        """Serves one request, counts it, and returns its tensors serialized and its handle."""
        error: BaseException | None = None
        try:
            tensors, handle = await serve(request)
            return [serialize_tensor(t) for t in tensors], handle
        except BaseException as e:
            error = e
            raise
        finally:
            self._count(self.experts.get(request.expert), method, error)

    async def _many(self, method: str, request: ExpertCalls, serve: Callable) -> ExpertResults:  # type: ignore[type-arg]
        if len(request.calls) > MAX_CALLS_PER_REQUEST:
            raise InvalidRequest(f"calls: {len(request.calls)} given; the limit is {MAX_CALLS_PER_REQUEST}")
        outcomes = await asyncio.gather(*(self._counted(method, call, serve) for call in request.calls),
                                        return_exceptions=True)
        results = []
        for call, outcome in zip(request.calls, outcomes):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if isinstance(outcome, BaseException):
                code = outcome.code if isinstance(outcome, RequestError) else grpc.StatusCode.INTERNAL
                message = str(outcome) if isinstance(outcome, RequestError) else (
                    f"{method} of expert {call.expert!r} failed: {type(outcome).__name__}: {outcome}")
                results.append(ExpertResult(code=code.name, error=message))
            else:
                tensors, handle = outcome
                results.append(ExpertResult(tensors=tensors, handle=handle, dtype=self.experts[call.expert].spec.dtype))
        return ExpertResults(results=results)

    def _count(self, expert: Expert | None, method: str, error: BaseException | None) -> None:
        if self.metrics is not None:
            self.metrics.request(expert.spec.kind if expert is not None else "unknown", method, status_name(error))

    # ---- checks

    def _expert(self, name: str) -> Expert:
        expert = self.experts.get(name)
        if expert is None:
            hosted = ", ".join(sorted(self.experts)[:10]) or "none"
            raise UnknownExpert(f"expert {name!r} is not hosted here (hosted: {hosted})")
        return expert

    def _tensors(self, request: ExpertRequest) -> list[torch.Tensor]:
        if len(request.tensors) > MAX_TENSORS_PER_REQUEST:
            raise InvalidRequest(f"tensors: {len(request.tensors)} given; the limit is {MAX_TENSORS_PER_REQUEST}")
        tensors = []
        for index, message in enumerate(request.tensors):
            try:
                tensors.append(deserialize_tensor(message, self.max_tensor_bytes))
            except (InvalidRequest, PayloadTooLarge) as e:
                raise type(e)(f"expert {request.expert!r}: tensor {index}: {e}") from None
        return tensors

    def _check(self, check: Callable[[], object]) -> None:
        try:
            check()
        except ValueError as e:
            raise InvalidRequest(str(e)) from None

    async def _submit(self, expert: Expert, method: str, function, tensors: list[torch.Tensor],  # type: ignore[no-untyped-def]
                      keywords: tuple[str, ...], *, alone: bool = False) -> list[torch.Tensor]:
        """Runs `function` in a batch of requests with the same keywords, dtypes and shapes but dim 0."""
        group = keywords + tuple(f"{t.dtype}{list(t.shape[1:])}" for t in tensors)
        try:
            return await self.runtime.submit((expert.name, method), function, tensors, alone=alone, group=group)
        except BatchTooLarge as e:
            raise PayloadTooLarge(f"expert {expert.name!r}: {e}") from None
        except QueueFull as e:
            raise Busy(str(e)) from None


def _named(what: str, tensors: list[torch.Tensor], keywords: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """`tensors` by the names a refusal gives them: "input", or "input 1" and "input 'mask'" for several."""
    if len(tensors) == 1:
        return {what: tensors[0]}
    positional = len(tensors) - len(keywords)
    names = [f"{what} {i}" for i in range(positional)] + [f"{what} {k!r}" for k in keywords]
    return dict(zip(names, tensors))


def _refuse_non_finite(expert: Expert, method: str, tensors: dict[str, torch.Tensor], *,
                       overflowed: bool = False) -> None:
    """INVALID_ARGUMENT naming the first tensor that holds a NaN or an infinity: one received, or
    (`overflowed`) one computed from finite values too large for float32."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            cause = ("overflowed float32 (the request's values are too large)" if overflowed
                     else "holds NaN or infinite values")
            raise InvalidRequest(f"expert {expert.name!r}: {method}: the {name} {cause}; refused")

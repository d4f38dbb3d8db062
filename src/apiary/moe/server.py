"""The expert server's gRPC service: Forward, Backward and Info on hosted experts.

`ExpertServer` holds the experts and the batching runtime and serves `EXPERTS_SERVICE` on an
`RpcServer` (`attach`). Every request is checked before it joins a batch (known expert, input
dtype and shape, batch size), so one bad request never fails other callers' batch; a refused
request gets INVALID_ARGUMENT, NOT_FOUND or RESOURCE_EXHAUSTED with a message naming the
expert and what is wrong, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import os

from collections.abc import Iterable

import grpc
import torch

from apiary.moe.checkpoints import load_checkpoints, save_checkpoints
from apiary.moe.experts import Expert
from apiary.moe.protos.moe_pb2 import (
    ExpertRequest,
    ExpertResponse,
    InfoReply,
    InfoRequest,
)
from apiary.moe.runtime import BatchingRuntime, BatchStats, BatchTooLarge, QueueFull
from apiary.wire import CallContext, InvalidRequest, Method, RpcServer, ServiceSpec
from apiary.wire.errors import PayloadTooLarge
from apiary.wire.tensors import deserialize_tensor, serialize_tensor

EXPERTS_SERVICE = ServiceSpec(
    "apiary.moe.Experts",
    (
        Method("Forward", ExpertRequest, ExpertResponse),
        Method("Backward", ExpertRequest, ExpertResponse),
        Method("Info", InfoRequest, InfoReply),
    ),
)

MAX_TENSORS_PER_REQUEST = 16


class UnknownExpert(InvalidRequest):
    """No expert of that name is hosted here: NOT_FOUND."""

    code = grpc.StatusCode.NOT_FOUND


class ExpertServer:
    """Hosts experts behind one batching runtime. `await start()` before serving, `close()` after."""

    def __init__(self, experts: Iterable[Expert], runtime: BatchingRuntime | None = None, *,
                 max_tensor_bytes: int = 1 << 30, checkpoint_dir: str | os.PathLike[str] | None = None,
                 checkpoint_period: float = 300.0):
        self.experts: dict[str, Expert] = {}
        for expert in experts:
            if expert.name in self.experts:
                raise ValueError(f"two experts are named {expert.name!r}")
            self.experts[expert.name] = expert
        self.runtime = runtime or BatchingRuntime()
        self.max_tensor_bytes = max_tensor_bytes
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_period = checkpoint_period
        self._checkpointing: asyncio.Task[None] | None = None

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
        expert = self._expert(request.expert)
        inputs = self._tensors(request)
        self._check(expert, lambda: expert.check_inputs(inputs))
        outputs = await self._submit(expert, "forward", expert.forward, inputs)
        return ExpertResponse(tensors=[serialize_tensor(t) for t in outputs])

    async def backward(self, request: ExpertRequest, context: CallContext) -> ExpertResponse:
        expert = self._expert(request.expert)
        tensors = self._tensors(request)
        if len(tensors) != 2:
            raise InvalidRequest(f"expert {expert.name!r}: Backward takes the input and the output gradient "
                                 f"(2 tensors), got {len(tensors)}")
        inputs, grad_outputs = tensors[:1], tensors[1:]
        self._check(expert, lambda: (expert.check_inputs(inputs), expert.check_grad_outputs(inputs, grad_outputs)))
        grads = await self._submit(expert, "backward",
                                   lambda joined: expert.backward(joined[:1], joined[1:]), tensors)
        return ExpertResponse(tensors=[serialize_tensor(t) for t in grads])

    async def info(self, request: InfoRequest, context: CallContext) -> InfoReply:
        expert = self._expert(request.expert)
        forward = self.runtime.stats.get((expert.name, "forward"), BatchStats())
        backward = self.runtime.stats.get((expert.name, "backward"), BatchStats())
        return InfoReply(
            name=expert.name, kind=expert.spec.kind, hidden_size=expert.spec.hidden_size,
            max_batch_size=self.runtime.max_batch_size,
            forward_batches=forward.batches, forward_requests=forward.requests,
            backward_batches=backward.batches, backward_requests=backward.requests,
            updates=expert.updates,
        )

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
            except InvalidRequest as e:
                raise type(e)(f"expert {request.expert!r}: tensor {index}: {e}") from None
        return tensors

    def _check(self, expert: Expert, check: object) -> None:
        try:
            check()  # type: ignore[operator]
        except ValueError as e:
            raise InvalidRequest(str(e)) from None

    async def _submit(self, expert: Expert, method: str, function, tensors: list[torch.Tensor]) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
        try:
            return await self.runtime.submit((expert.name, method), function, tensors)
        except BatchTooLarge as e:
            raise PayloadTooLarge(f"expert {expert.name!r}: {e}") from None
        except QueueFull as e:
            raise PayloadTooLarge(str(e)) from None

"""The local API's methods and the schema of the tensors a trainer registers.

`LOCAL_SERVICE` is served by the averager service on a local-only port. The trainer first
registers the dtypes and shapes of the tensors it wants averaged (the schema), then asks for
one round at a time:

- through shared memory (trainer and averager on one host: same pod, same compose bundle):
  the trainer creates a segment holding its tensors flattened to float32, the averager maps
  it, and `AverageShared` averages in place there; no tensor crosses gRPC;
- through gRPC streaming otherwise: `Average` streams the tensors in and the averaged ones back.

A trainer that knows when its next round comes (the epoch's end) calls `Prepare` a little
earlier: the group forms while it computes, and the round goes straight to the all-reduce.

Besides rounds, the trainer publishes its state (`PublishState`: metadata and tensors), which
the averager keeps and serves to newcomers even while the trainer is busy or gone, and loads
the swarm's newest state (`LoadState`) when it starts.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from apiary.averaging.protos.local_pb2 import (
    AverageReply,
    AverageRequest,
    AverageSharedReply,
    AverageSharedRequest,
    LoadStateReply,
    LoadStateRequest,
    PrepareReply,
    PrepareRequest,
    PublishStateReply,
    PublishStateRequest,
    RegisterReply,
    RegisterRequest,
)
from apiary.wire import InvalidRequest, Method, PayloadTooLarge, ServiceSpec
from apiary.wire.chunks import check_header, make_header
from apiary.wire.framing import MAX_TENSORS_PER_REQUEST
from apiary.wire.protos.wire_pb2 import TensorChunk, TensorHeader
from apiary.wire.tensors import dtype_name, torch_dtype

LOCAL_SERVICE = ServiceSpec(
    "apiary.averaging.Local",
    (
        Method("Register", RegisterRequest, RegisterReply),
        Method("Average", AverageRequest, AverageReply, client_streaming=True, server_streaming=True),
        Method("AverageShared", AverageSharedRequest, AverageSharedReply),
        Method("Prepare", PrepareRequest, PrepareReply),
        Method("PublishState", PublishStateRequest, PublishStateReply, client_streaming=True),
        Method("LoadState", LoadStateRequest, LoadStateReply, server_streaming=True),
    ),
    local=True,
)

OK, NO_GROUP, FAILED = "ok", "no_group", "failed"  # how a round went (RoundOutcome.result)
MAX_REGISTERED_TENSORS = MAX_TENSORS_PER_REQUEST


@dataclass(frozen=True)
class Schema:
    """The dtypes and shapes of the tensors a trainer averages, in order."""

    tensors: tuple[tuple[str, tuple[int, ...]], ...]  # (torch dtype name without "torch.", shape)

    @classmethod
    def of_tensors(cls, tensors: Sequence[torch.Tensor]) -> Schema:
        return cls(tuple((dtype_name(t.dtype), tuple(t.shape)) for t in tensors))

    @classmethod
    def of_headers(cls, headers: Sequence[TensorHeader], max_tensor_bytes: int) -> Schema:
        """The schema a Register request declares; raises InvalidRequest naming what is wrong."""
        if not headers:
            raise InvalidRequest("register at least one tensor")
        if len(headers) > MAX_REGISTERED_TENSORS:
            raise InvalidRequest(f"{len(headers)} tensors registered; the limit is {MAX_REGISTERED_TENSORS}")
        entries = []
        for index, header in enumerate(headers):
            try:
                check_header(header, max_tensor_bytes)
                dtype = torch_dtype(header.dtype)
            except (InvalidRequest, PayloadTooLarge) as e:
                raise type(e)(f"tensor {index}: {e}") from None
            if not dtype.is_floating_point:
                raise InvalidRequest(f"tensor {index}: dtype {header.dtype} cannot be averaged (floating-point only)")
            entries.append((header.dtype, tuple(header.shape)))
        schema = cls(tuple(entries))
        if schema.numel == 0:
            raise InvalidRequest("the registered tensors hold no elements")
        return schema

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def numels(self) -> list[int]:
        return [math.prod(shape) for _, shape in self.tensors]

    @property
    def numel(self) -> int:
        return sum(self.numels)

    @property
    def digest(self) -> str:
        """What averagers compare to average together: peers average only with equal digests."""
        shapes = [(shape, str(torch_dtype(dtype))) for dtype, shape in self.tensors]
        return hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]

    def headers(self) -> list[TensorHeader]:
        return [make_header(dtype, shape, numel * torch_dtype(dtype).itemsize)
                for (dtype, shape), numel in zip(self.tensors, self.numels)]

    @staticmethod
    def describe(dtype: str, shape: Sequence[int]) -> str:
        return f"{dtype}{list(shape)}"

    def check(self, index: int, dtype: str, shape: Sequence[int]) -> None:
        """Raises InvalidRequest unless tensor `index` may have this dtype and shape."""
        if index >= len(self.tensors):
            raise InvalidRequest(f"tensor {index} is one too many: the registered schema has {len(self.tensors)} tensors")
        expected = self.tensors[index]
        if (dtype, tuple(shape)) != expected:
            raise InvalidRequest(
                f"tensor {index} is {self.describe(dtype, shape)}, the registered schema has "
                f"{self.describe(*expected)} (register again to change the schema)"
            )


async def tensor_chunks(messages: AsyncIterator[Any], after: str,
                        check: Callable[[int, TensorHeader], None] | None = None) -> AsyncIterator[TensorChunk]:
    """The tensor chunks of a stream's messages that follow its first part (`after` names it):
    each must be a chunk. `check` sees each tensor's index and header before its bytes arrive."""
    index = 0
    async for message in messages:
        if message.WhichOneof("part") != "chunk":
            raise InvalidRequest(f"only tensor chunks may follow {after}")
        if check is not None and message.chunk.HasField("header"):
            check(index, message.chunk.header)
            index += 1
        yield message.chunk

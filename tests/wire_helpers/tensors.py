"""Tensor helpers for the wire tests: random contents of any dtype, bit-exact comparison."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable

import torch

from apiary.wire import ChannelPool, Endpoint, RpcClient
from apiary.wire.chunks import DTYPE_ITEMSIZE
from apiary.wire.probe import PROBE
from apiary.wire.protos.wire_pb2 import TensorChunk
from apiary.wire.tensors import receive_tensors, tensors_to_chunks


def wire_dtypes() -> list[str]:
    """The names in DTYPE_ITEMSIZE that this torch has."""
    return [name for name in DTYPE_ITEMSIZE if isinstance(getattr(torch, name, None), torch.dtype)]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A tensor whose bytes are random (NaNs, infinities and denormals included); bools are 0/1."""
    generator = torch.Generator().manual_seed(seed)
    count = math.prod(shape)
    raw = torch.randint(0, 256, (count * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        raw %= 2
    return raw.view(dtype).reshape(shape)


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as bytes, in logical (row-major) order."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_exact(received: torch.Tensor, sent: torch.Tensor) -> None:
    assert received.dtype == sent.dtype
    assert received.shape == sent.shape
    assert torch.equal(raw_bytes(received), raw_bytes(sent)), f"{sent.dtype}{list(sent.shape)} changed in transit"


async def as_stream(chunks: Iterable[TensorChunk]) -> AsyncIterator[TensorChunk]:
    for chunk in chunks:
        yield chunk


async def echo(
    pool: ChannelPool, endpoint: Endpoint, tensors: list[torch.Tensor], chunk_bytes: int, *, timeout: float = 30.0
) -> tuple[list[torch.Tensor], int]:
    """Sends `tensors` through the peer's Echo stream; returns what came back and the reply chunk count."""
    client = RpcClient(pool, PROBE, endpoint, timeout=timeout)
    replies = 0

    async def counted(stream: AsyncIterator[TensorChunk]) -> AsyncIterator[TensorChunk]:
        nonlocal replies
        async for chunk in stream:
            replies += 1
            yield chunk

    stream = client.stream("Echo", as_stream(tensors_to_chunks(tensors, chunk_bytes)))
    received = [tensor async for tensor in receive_tensors(counted(stream), max_tensor_bytes=1 << 31)]
    return received, replies

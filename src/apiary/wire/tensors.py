"""Torch tensors on the wire: any dtype (bfloat16 and float8 included), any shape, bit-exact.

Sending views the tensor's memory as bytes and cuts it into chunks (`apiary.wire.chunks`);
receiving copies each chunk once into a preallocated buffer that becomes the tensor's storage.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

import torch

from apiary.wire.chunks import DTYPE_ITEMSIZE, Budget, ChunkAssembler, check_header, make_header, split_payload
from apiary.wire.errors import InvalidRequest
from apiary.wire.protos.wire_pb2 import TensorChunk, TensorHeader


def dtype_name(dtype: torch.dtype) -> str:
    """Torch's name of a dtype without the `torch.` prefix, as it travels on the wire."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_ITEMSIZE:
        raise TypeError(f"tensors of dtype {dtype} cannot be sent (supported: {', '.join(DTYPE_ITEMSIZE)})")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named `name`; raises InvalidRequest for an unknown or unsupported name."""
    dtype = getattr(torch, name, None) if name in DTYPE_ITEMSIZE else None
    if not isinstance(dtype, torch.dtype):
        raise InvalidRequest(f"tensor dtype {name!r} is not supported by this peer's torch {torch.__version__}")
    return dtype


def _as_bytes(tensor: torch.Tensor) -> tuple[TensorHeader, memoryview]:
    tensor = tensor.detach()
    header = make_header(dtype_name(tensor.dtype), tuple(tensor.shape), tensor.numel() * tensor.element_size())
    flat = tensor.to("cpu").contiguous().reshape(-1)
    return header, memoryview(flat.view(torch.uint8).numpy())


def tensor_payload(tensor: torch.Tensor) -> tuple[TensorHeader, memoryview]:
    """A tensor's header and a view of its bytes, as the bulk transport sends them."""
    return _as_bytes(tensor)


def tensor_to_chunks(tensor: torch.Tensor, chunk_bytes: int) -> Iterator[TensorChunk]:
    """The chunks that carry `tensor`; the first holds its header."""
    header, payload = _as_bytes(tensor)
    return split_payload(header, payload, chunk_bytes)


def tensors_to_chunks(tensors: Iterable[torch.Tensor], chunk_bytes: int) -> Iterator[TensorChunk]:
    """The chunks of several tensors, one after another."""
    for tensor in tensors:
        yield from tensor_to_chunks(tensor, chunk_bytes)


def tensor_from_payload(header: TensorHeader, payload: bytearray) -> torch.Tensor:
    """The tensor whose bytes are `payload` (shared, not copied)."""
    dtype = torch_dtype(header.dtype)
    if not payload:
        return torch.empty(tuple(header.shape), dtype=dtype)
    return torch.frombuffer(payload, dtype=torch.uint8).view(dtype).reshape(tuple(header.shape))


def serialize_tensor(tensor: torch.Tensor) -> TensorChunk:
    """A small tensor as one message (header and all its bytes)."""
    header, payload = _as_bytes(tensor)
    return TensorChunk(header=header, data=payload.tobytes())


def deserialize_tensor(message: TensorChunk, max_tensor_bytes: int) -> torch.Tensor:
    """The tensor in a single-message `TensorChunk`; raises InvalidRequest if it is inconsistent."""
    if not message.HasField("header"):
        raise InvalidRequest("a tensor message must carry a header")
    check_header(message.header, max_tensor_bytes)
    if len(message.data) != message.header.nbytes:
        raise InvalidRequest(f"tensor message carries {len(message.data)} bytes, its header declares {message.header.nbytes}")
    return tensor_from_payload(message.header, bytearray(message.data))


async def receive_tensors(
    chunks: AsyncIterable[TensorChunk], max_tensor_bytes: int, budget: Budget | None = None
) -> AsyncIterator[torch.Tensor]:
    """Reassembles the tensors of a chunk stream, yielding each as soon as it is complete (each
    tensor's bytes reserved in `budget`, if given, while it is received)."""
    with ChunkAssembler(max_tensor_bytes, budget) as assembler:
        async for chunk in chunks:
            done = assembler.feed(chunk)
            if done is not None:
                yield tensor_from_payload(*done)
        assembler.close()

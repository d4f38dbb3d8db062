"""Tensor payloads cut into chunks and put back together, without torch.

A tensor travels as a `TensorHeader` (dtype, shape, byte count) followed by its raw bytes,
cut into chunks no larger than a configured size so that each gRPC message stays small. The
receiver checks the header against its limits before allocating anything (and, on a server,
takes the tensor's bytes from the server's budget of bytes in flight), then copies each chunk
once into a buffer that grows as the chunks arrive. Torch-free so that every peer (the DHT included) can
relay and check tensor streams.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import TracebackType
from typing import Protocol

from apiary.wire.errors import InvalidRequest, PayloadTooLarge
from apiary.wire.protos.wire_pb2 import TensorChunk, TensorHeader

# Bytes per element of every torch dtype that travels over the wire, by torch's name for it.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
}  # fmt: skip


def make_header(dtype: str, shape: tuple[int, ...] | list[int], nbytes: int) -> TensorHeader:
    return TensorHeader(dtype=dtype, shape=shape, nbytes=nbytes)


MAX_DIMS = 32
MAX_EXTENT = 1 << 50  # bytes the non-zero dimensions may span, even for an empty tensor


def check_header(header: TensorHeader, max_tensor_bytes: int) -> None:
    """Raises InvalidRequest unless the header describes a tensor this peer accepts."""
    itemsize = DTYPE_ITEMSIZE.get(header.dtype)
    if itemsize is None:
        raise InvalidRequest(f"tensor dtype {header.dtype!r} is not supported (known: {', '.join(DTYPE_ITEMSIZE)})")
    if any(dim < 0 for dim in header.shape):
        raise InvalidRequest(f"tensor shape {list(header.shape)} has a negative dimension")
    if len(header.shape) > MAX_DIMS or math.prod(dim for dim in header.shape if dim) * itemsize > MAX_EXTENT:
        # an empty tensor may not hide absurd dimensions either: torch's strides would overflow
        raise InvalidRequest(f"tensor shape {list(header.shape)[:MAX_DIMS + 1]} is out of range "
                             f"(at most {MAX_DIMS} dimensions, {MAX_EXTENT} bytes spanned)")
    expected = math.prod(header.shape) * itemsize
    if header.nbytes != expected:
        raise InvalidRequest(
            f"tensor header says {header.nbytes} bytes but {header.dtype}{list(header.shape)} needs {expected}"
        )
    if header.nbytes > max_tensor_bytes:
        raise PayloadTooLarge(f"tensor of {header.nbytes} bytes exceeds the limit max_tensor_bytes={max_tensor_bytes}")


def split_payload(header: TensorHeader, payload: memoryview, chunk_bytes: int) -> Iterator[TensorChunk]:
    """The chunks of one tensor: the first carries the header; an empty tensor is one chunk."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    payload = payload.cast("B")
    yield TensorChunk(header=header, data=bytes(payload[:chunk_bytes]))
    for start in range(chunk_bytes, len(payload), chunk_bytes):
        yield TensorChunk(data=bytes(payload[start : start + chunk_bytes]))


class Budget(Protocol):
    """Where a receiver reserves the bytes it allocates (`apiary.wire.limits.ByteBudget`)."""

    def take(self, nbytes: int, what: str) -> None: ...

    def give_back(self, nbytes: int) -> None: ...


class ChunkAssembler:
    """Consumes a stream of chunks and returns each tensor's header and bytes once complete.

    A tensor's buffer grows as its chunks arrive (each chunk copied once), so memory follows the
    bytes received, never a header's declared size. With a `budget`, each tensor's bytes are
    reserved when its header arrives (refused with LimitExceeded if they do not fit) and given
    back when the next tensor starts or the assembler is closed: use it as a context manager so
    that an aborted stream gives them back and drops the partial tensor at once."""

    def __init__(self, max_tensor_bytes: int, budget: Budget | None = None):
        self.max_tensor_bytes = max_tensor_bytes
        self.budget = budget
        self._held = 0
        self._header: TensorHeader | None = None
        self._buffer = bytearray()

    def __enter__(self) -> ChunkAssembler:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self._give_back()
        self._header, self._buffer = None, bytearray()  # a failed stream's partial tensor dies with it

    def _give_back(self) -> None:
        if self.budget is not None and self._held:
            self.budget.give_back(self._held)
        self._held = 0

    def feed(self, chunk: TensorChunk) -> tuple[TensorHeader, bytearray] | None:
        """Adds a chunk; returns (header, payload) when it completes a tensor, else None."""
        if chunk.HasField("header"):
            if self._header is not None:
                raise InvalidRequest(
                    f"a new tensor header arrived after {len(self._buffer)} of {self._header.nbytes} bytes of the previous one"
                )
            check_header(chunk.header, self.max_tensor_bytes)
            self._give_back()  # the previous tensor is the caller's now
            if self.budget is not None:
                self.budget.take(chunk.header.nbytes, "a tensor")
                self._held = chunk.header.nbytes
            self._header = chunk.header
            self._buffer = bytearray()
        elif self._header is None:
            raise InvalidRequest("a tensor chunk without a header arrived where a new tensor must start")
        if len(self._buffer) + len(chunk.data) > self._header.nbytes:
            raise InvalidRequest(f"tensor chunks carry more than the {self._header.nbytes} bytes its header declares")
        self._buffer += chunk.data
        if len(self._buffer) < self._header.nbytes:
            return None
        header, buffer = self._header, self._buffer
        self._header, self._buffer = None, bytearray()
        return header, buffer

    def close(self) -> None:
        """Gives back the reserved bytes; raises InvalidRequest if the stream ended in the middle of a tensor."""
        self._give_back()
        if self._header is not None:
            header, received = self._header, len(self._buffer)
            self._header, self._buffer = None, bytearray()
            raise InvalidRequest(f"the stream ended after {received} of {header.nbytes} bytes of a tensor")

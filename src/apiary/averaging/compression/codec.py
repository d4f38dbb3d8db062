"""The interface every codec of `apiary.averaging.compression` implements, and the checks they share."""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

FLOAT16_MAX = 65504.0  # the largest finite float16; float16 codecs clamp to ±this
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
UNIT_ROUNDOFF = 2.0**-24  # unit roundoff of float32
TINY = 2.0**-126  # absolute slack for arithmetic that ends in float32 subnormals


class Codec(ABC):
    """Encodes a 1-D float part into tensors for the wire and back into float32."""

    name: str

    @abstractmethod
    def encode(self, part: torch.Tensor) -> list[torch.Tensor]:
        """The contiguous CPU tensors that carry `part` (1-D, floating, finite)."""

    @abstractmethod
    def decode(self, encoded: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        """The float32 vector of `numel` elements that `encoded` carries; ValueError if malformed."""

    @abstractmethod
    def error_bound(self, part: torch.Tensor) -> float:
        """The largest |decode(encode(part)) - part.float()| over the elements of `part`."""

    @abstractmethod
    def wire_bytes(self, numel: int) -> int:
        """Bytes on the wire (tensor payloads) for a part of `numel` elements."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"





def float32_part(part: torch.Tensor) -> torch.Tensor:
    """`part` as float32 (no copy when it already is), after checking it is a 1-D float tensor."""
    if not isinstance(part, torch.Tensor):
        raise ValueError(f"part must be a torch.Tensor, got {type(part).__name__}")
    if part.dim() != 1:
        raise ValueError(f"part must be 1-D, got shape {tuple(part.shape)}")
    if not part.is_floating_point():
        raise ValueError(f"part must be a floating-point tensor, got dtype {part.dtype}")
    return part.detach().to(torch.float32)


def check_finite(x: torch.Tensor, codec: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{codec}: part has inf or NaN values, which this codec cannot encode")


def check_numel(numel: int) -> int:
    try:
        value = operator.index(numel)
    except TypeError:
        raise ValueError(f"numel must be an integer, got {type(numel).__name__}") from None
    if isinstance(numel, bool) or value < 0:
        raise ValueError(f"numel must be a non-negative integer, got {numel!r}")
    return value


def unpack(
    codec: str, encoded: Sequence[torch.Tensor], specs: Sequence[tuple[str, torch.dtype, tuple[int, ...] | None]]
) -> list[torch.Tensor]:
    """`encoded` checked against (label, dtype, shape) specs; shape None means checked later."""
    if isinstance(encoded, torch.Tensor) or not isinstance(encoded, Sequence):
        raise ValueError(f"{codec}: encoded part must be a sequence of tensors, got {type(encoded).__name__}")
    labels = ", ".join(label for label, _, _ in specs)
    if len(encoded) != len(specs):
        raise ValueError(f"{codec}: expected {len(specs)} tensor(s) ({labels}), got {len(encoded)}")
    for tensor, (label, dtype, shape) in zip(encoded, specs):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{codec}: {label} must be a tensor, got {type(tensor).__name__}")
        if tensor.dtype != dtype:
            raise ValueError(f"{codec}: {label} must be {dtype}, got {tensor.dtype}")
        if shape is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{codec}: {label} must have shape {list(shape)}, got {list(tensor.shape)}")
    return list(encoded)


def contiguous_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to("cpu").contiguous()


def round_float32(value: float) -> float:
    """`value` rounded to float32 (inf if it overflows)."""
    return torch.tensor(value, dtype=torch.float64).to(torch.float32).item()

"""The 8-bit codecs: `uniform8` (one range for the part) and `blockwise8` (a range per block).

Each group of values (the whole part, or a block) is sent as uint8 codes
k = round((x - min) / scale), scale = (max - min) / 255, and decoded as min + k * scale.
The error is scale / 2, plus float32 rounding: 1e-4 * scale for (x - min) / scale
(about 510 * 2^-24 of a code) and 2^-23 * max(|min|, |max|) for min + k * scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from apiary.averaging.compression.codec import (
    FLOAT32_MAX,
    TINY,
    Codec,
    check_numel,
    contiguous_cpu,
    float32_part,
    unpack,
)

_LEVELS = 255  # uint8 codes 0..255
_SLACK = 1e-4  # relative slack of 8-bit codes for float32 rounding in (x - min) / scale


def _quantization_params(
    low: torch.Tensor, high: torch.Tensor, codec: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(min, max, scale) per group, float32, from the groups' minima and maxima; ValueError if
    a group holds inf or NaN (aminmax propagates NaN) or its codes would overflow float32."""
    if not bool(torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise ValueError(f"{codec}: part has inf or NaN values, which this codec cannot encode")
    low64, high64 = low.to(torch.float64), high.to(torch.float64)
    if bool(((high64 - low64) > FLOAT32_MAX).any()):
        raise ValueError(f"{codec}: values span more than float32's range ({FLOAT32_MAX:.3g})")
    scale = ((high64 - low64) / _LEVELS).to(torch.float32)
    if not bool(torch.isfinite(low + _LEVELS * scale).all()):
        raise ValueError(f"{codec}: min + 255 * scale overflows float32")
    return low, high, scale


def _quantize(x: torch.Tensor, low: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """uint8 codes of rows `x` (groups along the last dim) into `out`; low/scale broadcast."""
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: all codes 0
    out.copy_(x.sub(low).div_(safe_scale).round_().clamp_(0, _LEVELS))


def _check_params(low: torch.Tensor, scale: torch.Tensor, codec: str) -> None:
    if not bool(torch.isfinite(low).all() and torch.isfinite(scale).all()):
        raise ValueError(f"{codec}: min and scale must be finite")
    if bool((scale < 0).any()):
        raise ValueError(f"{codec}: scale must be non-negative")
    if not bool(torch.isfinite(low + _LEVELS * scale).all()):
        raise ValueError(f"{codec}: min + 255 * scale overflows float32")


def _block_rows(x: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """2-D views of 1-D `x`, a block per row: the full blocks, then the partial last block (each
    left out when empty), so that per-block work is a couple of vectorized calls."""
    full = x.numel() // block_size * block_size
    rows = [x[:full].view(-1, block_size)] if full else []
    if full < x.numel():
        rows.append(x[full:].view(1, -1))
    return rows


def _bound(low: torch.Tensor, high: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    peak = torch.maximum(low.abs(), high.abs()).to(torch.float64)
    return scale.to(torch.float64) * (0.5 + _SLACK) + 2.0**-23 * peak + TINY


class Uniform8Bit(Codec):
    """256 uniform levels between the part's min and max: uint8 codes, float32 [min, scale].

    Error: scale / 2 (scale = (max - min) / 255) plus a float32-rounding epsilon.
    """

    name = "uniform8"

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        low, high = (v.reshape(1) for v in torch.aminmax(x))
        return _quantization_params(low, high, self.name)

    def encode(self, part: torch.Tensor) -> list[torch.Tensor]:
        x = float32_part(part)
        if x.numel() == 0:
            return [torch.zeros(0, dtype=torch.uint8), torch.zeros(2, dtype=torch.float32)]
        low, _, scale = self._params(x)
        codes = torch.empty(x.numel(), dtype=torch.uint8, device=x.device)
        _quantize(x, low, scale, codes)
        return [contiguous_cpu(codes), contiguous_cpu(torch.cat([low, scale]))]

    def decode(self, encoded: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        numel = check_numel(numel)
        specs = [("codes", torch.uint8, (numel,)), ("[min, scale]", torch.float32, (2,))]
        codes, params = unpack(self.name, encoded, specs)
        _check_params(params[:1], params[1:], self.name)
        low, scale = params.tolist()
        return codes.to(torch.float32).mul_(scale).add_(low)

    def error_bound(self, part: torch.Tensor) -> float:
        x = float32_part(part)
        if x.numel() == 0:
            return 0.0
        low, high, scale = self._params(x)
        return _bound(low, high, scale).item()

    def wire_bytes(self, numel: int) -> int:
        return check_numel(numel) + 8


class Blockwise8Bit(Codec):
    """uniform8 per block of `block_size` elements: an outlier costs precision in its block only.

    Wire: uint8 codes; float32 [mins; scales] of shape (2, blocks); int64 [block_size]. The block
    size travels, so any blockwise8 codec decodes parts from a sender with another block size.
    Error: the largest over blocks of the block's scale / 2, plus a float32-rounding epsilon.
    """

    name = "blockwise8"

    def __init__(self, block_size: int = 4096):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.block_size = block_size

    def __repr__(self) -> str:
        return f"Blockwise8Bit(block_size={self.block_size})"

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lows, highs = zip(*(torch.aminmax(rows, dim=1) for rows in _block_rows(x, self.block_size)))
        return _quantization_params(torch.cat(lows), torch.cat(highs), self.name)

    def encode(self, part: torch.Tensor) -> list[torch.Tensor]:
        x = float32_part(part)
        block = torch.tensor([self.block_size], dtype=torch.int64)
        if x.numel() == 0:
            return [torch.zeros(0, dtype=torch.uint8), torch.zeros(2, 0, dtype=torch.float32), block]
        low, _, scale = self._params(x)
        codes = torch.empty(x.numel(), dtype=torch.uint8, device=x.device)
        first = 0
        for rows, out in zip(_block_rows(x, self.block_size), _block_rows(codes, self.block_size)):
            count = rows.shape[0]
            _quantize(rows, low[first : first + count, None], scale[first : first + count, None], out)
            first += count
        return [contiguous_cpu(codes), contiguous_cpu(torch.stack([low, scale])), block]

    def decode(self, encoded: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        numel = check_numel(numel)
        specs = [
            ("codes", torch.uint8, (numel,)),
            ("[mins; scales]", torch.float32, None),  # shape checked once block_size is known
            ("block_size", torch.int64, (1,)),
        ]
        codes, params, block = unpack(self.name, encoded, specs)
        block_size = int(block.item())
        if block_size < 1:
            raise ValueError(f"{self.name}: block_size must be positive, got {block_size}")
        blocks = -(-numel // block_size)
        if tuple(params.shape) != (2, blocks):
            raise ValueError(
                f"{self.name}: [mins; scales] must have shape [2, {blocks}] for {numel} elements in blocks of "
                f"{block_size}, got {list(params.shape)}"
            )
        low, scale = params[0], params[1]
        _check_params(low, scale, self.name)
        values = codes.to(torch.float32)
        first = 0
        for rows in _block_rows(values, block_size):  # views into `values`, scaled in place
            count = rows.shape[0]
            rows.mul_(scale[first : first + count, None]).add_(low[first : first + count, None])
            first += count
        return values

    def error_bound(self, part: torch.Tensor) -> float:
        x = float32_part(part)
        if x.numel() == 0:
            return 0.0
        low, high, scale = self._params(x)
        return _bound(low, high, scale).max().item()

    def wire_bytes(self, numel: int) -> int:
        numel = check_numel(numel)
        return numel + 8 * -(-numel // self.block_size) + 8

"""Codecs that shrink the parts of an all-reduce on the wire.

A part is a 1-D floating tensor (float32 typically). `Codec.encode` turns it into a few
contiguous CPU tensors that the bulk transport carries bit-exactly; `Codec.decode` turns the
received tensors back into a float32 vector. The sender picks the codec of each part and names
it on the wire; the receiver looks the name up with `codec_by_name` and decodes.

Every bound below compares the decoded values with `part.to(torch.float32)` (so a float64 part
loses float32 rounding first, and that loss is not counted). `error_bound` is a true upper bound
of the elementwise error, float32 arithmetic included; `wire_bytes` is exact for these codecs.

| name           | tensors on the wire                                   | bytes per element |
|----------------|-------------------------------------------------------|-------------------|
| none           | float32 values                                        | 4                 |
| float16        | float16 values (clamped to ±65504)                    | 2                 |
| scaled_float16 | float16 (x - mean) / std; float32 [mean, std]         | 2 (+8)            |
| uniform8       | uint8 codes; float32 [min, scale]                     | 1 (+8)            |
| blockwise8     | uint8 codes; float32 [mins; scales] per block; block  | 1 + 8/block (+8)  |

All codecs but `none` reject parts holding inf or NaN with a ValueError. `decode` checks the
structure of what a peer sent (count, dtypes, shapes, parameters) and raises ValueError for
anything malformed; it does not scan the values themselves.
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

import torch

FLOAT16_MAX = 65504.0  # the largest finite float16; float16 codecs clamp to ±this
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_U = 2.0**-24  # unit roundoff of float32
_TINY = 2.0**-126  # absolute slack for arithmetic that ends in float32 subnormals
_LEVELS = 255  # uint8 codes 0..255
_SLACK = 1e-4  # relative slack of 8-bit codes for float32 rounding in (x - min) / scale


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


# ---------------------------------------------------------------- input checks


def _float32_part(part: torch.Tensor) -> torch.Tensor:
    """`part` as float32 (no copy when it already is), after checking it is a 1-D float tensor."""
    if not isinstance(part, torch.Tensor):
        raise ValueError(f"part must be a torch.Tensor, got {type(part).__name__}")
    if part.dim() != 1:
        raise ValueError(f"part must be 1-D, got shape {tuple(part.shape)}")
    if not part.is_floating_point():
        raise ValueError(f"part must be a floating-point tensor, got dtype {part.dtype}")
    return part.detach().to(torch.float32)


def _check_finite(x: torch.Tensor, codec: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{codec}: part has inf or NaN values, which this codec cannot encode")


def _check_numel(numel: int) -> int:
    try:
        value = operator.index(numel)
    except TypeError:
        raise ValueError(f"numel must be an integer, got {type(numel).__name__}") from None
    if isinstance(numel, bool) or value < 0:
        raise ValueError(f"numel must be a non-negative integer, got {numel!r}")
    return value


def _unpack(
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


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to("cpu").contiguous()


def _f32(value: float) -> float:
    """`value` rounded to float32 (inf if it overflows)."""
    return torch.tensor(value, dtype=torch.float64).to(torch.float32).item()


# ---------------------------------------------------------------- float codecs


class NoCompression(Codec):
    """float32 as is: exact. encode/decode may share memory with their input (no copy)."""

    name = "none"

    def encode(self, part: torch.Tensor) -> list[torch.Tensor]:
        return [_cpu(_float32_part(part))]

    def decode(self, encoded: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        numel = _check_numel(numel)
        (values,) = _unpack(self.name, encoded, [("values", torch.float32, (numel,))])
        return values

    def error_bound(self, part: torch.Tensor) -> float:
        _float32_part(part)
        return 0.0

    def wire_bytes(self, numel: int) -> int:
        return 4 * _check_numel(numel)


class Float16(Codec):
    """A cast to float16, with values beyond ±65504 clamped to ±65504.

    Error: max(2^-11 * min(M, 65504), 2^-25, M - 65504) where M = max|x|: half a float16 ulp
    (relative 2^-11, absolute 2^-25 among subnormals), or the clamp where |x| > 65504.
    """

    name = "float16"

    def encode(self, part: torch.Tensor) -> list[torch.Tensor]:
        x = _float32_part(part)
        values = x.to(torch.float16)
        overflow = values.numel() and not all(math.isfinite(v.item()) for v in torch.aminmax(values))
        if overflow:  # values beyond ±65504, or inf/NaN in the part
            _check_finite(x, self.name)
            values = x.clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16)
        return [_cpu(values)]

    def decode(self, encoded: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        numel = _check_numel(numel)
        (values,) = _unpack(self.name, encoded, [("values", torch.float16, (numel,))])
        return values.to(torch.float32)

    def error_bound(self, part: torch.Tensor) -> float:
        x = _float32_part(part)
        if x.numel() == 0:
            return 0.0
        low, high = (v.item() for v in torch.aminmax(x))
        if not (math.isfinite(low) and math.isfinite(high)):
            _check_finite(x, self.name)
        peak = max(-low, high)
        return max(2.0**-11 * min(peak, FLOAT16_MAX), 2.0**-25, peak - FLOAT16_MAX)

    def wire_bytes(self, numel: int) -> int:
        return 2 * _check_numel(numel)


class ScaledFloat16(Codec):
    """(x - mean) / std in float16, with mean and std as float32; std 0 is sent as 1.

    Error: about 2^-11 * max|x - mean| (half a float16 ulp of the largest standardized value,
    scaled back), plus float32 rounding (a few 2^-24 * max|x|); values more than 65504 standard
    deviations from the mean (only possible in parts of over 4e9 elements) are clamped there.
    """

    name = "scaled_float16"

    @staticmethod
    def _center(x: torch.Tensor) -> tuple[torch.Tensor, float, float, float, float]:
        """(x - mean, mean, std, max|x - mean|, max|x|), shared by encode and error_bound: the
        two-pass std of float32 values (1 where it is 0); float64 only where float32 overflows."""
        mean = x.mean().item()
        if not math.isfinite(mean):  # inf/NaN in the part, or its float32 sum overflows
            _check_finite(x, "scaled_float16")
            mean = _f32(x.mean(dtype=torch.float64).item())
        low, high = (v.item() for v in torch.aminmax(x))
        spread = max(high - mean, mean - low)
        if spread > _FLOAT32_MAX:
            raise ValueError(f"scaled_float16: values span {high - low:.3g}, beyond float32's range")
        centered = x.sub(mean)
        norm = torch.linalg.vector_norm(centered).item()
        if not math.isfinite(norm):  # the float32 sum of squares overflows
            norm = torch.linalg.vector_norm(centered, dtype=torch.float64).item()
        std = _f32(norm / math.sqrt(x.numel()))
        return centered, mean, (std if std > 0 else 1.0), spread, max(abs(low), abs(high))

    def encode(self, part: torch.Tensor) -> list[torch.Tensor]:
        x = _float32_part(part)
        if x.numel() == 0:
            return [torch.zeros(0, dtype=torch.float16), torch.tensor([0.0, 1.0], dtype=torch.float32)]
        centered, mean, std, _, _ = self._center(x)
        z = centered.div_(std).clamp_(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16)
        return [_cpu(z), torch.tensor([mean, std], dtype=torch.float32)]

    def decode(self, encoded: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        numel = _check_numel(numel)
        specs = [("values", torch.float16, (numel,)), ("[mean, std]", torch.float32, (2,))]
        z, stats = _unpack(self.name, encoded, specs)
        mean, std = stats.tolist()
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ValueError(f"scaled_float16: mean {mean} must be finite and std {std} finite and positive")
        return z.to(torch.float32).mul_(std).add_(mean)

    def error_bound(self, part: torch.Tensor) -> float:
        x = _float32_part(part)
        if x.numel() == 0:
            return 0.0
        _, mean, std, spread, peak = self._center(x)
        rounding = max(2.0**-11 * spread, 2.0**-25 * std)  # half a float16 ulp, times std
        clamped = max(0.0, spread - FLOAT16_MAX * std)
        arithmetic = 4 * _U * spread + 2 * _U * (peak + abs(mean))  # float32 sub, div, mul, add
        return (rounding + clamped + arithmetic) * (1 + 1e-6) + _TINY

    def wire_bytes(self, numel: int) -> int:
        return 2 * _check_numel(numel) + 8


# ---------------------------------------------------------------- 8-bit codecs
#
# Each group of values (the whole part, or a block) is sent as uint8 codes
# k = round((x - min) / scale), scale = (max - min) / 255, and decoded as min + k * scale.
# The error is scale / 2, plus float32 rounding: 1e-4 * scale for (x - min) / scale
# (about 510 * 2^-24 of a code) and 2^-23 * max(|min|, |max|) for min + k * scale.


def _quantization_params(
    low: torch.Tensor, high: torch.Tensor, codec: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(min, max, scale) per group, float32, from the groups' minima and maxima; ValueError if
    a group holds inf or NaN (aminmax propagates NaN) or its codes would overflow float32."""
    if not bool(torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise ValueError(f"{codec}: part has inf or NaN values, which this codec cannot encode")
    low64, high64 = low.to(torch.float64), high.to(torch.float64)
    if bool(((high64 - low64) > _FLOAT32_MAX).any()):
        raise ValueError(f"{codec}: values span more than float32's range ({_FLOAT32_MAX:.3g})")
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
    return scale.to(torch.float64) * (0.5 + _SLACK) + 2.0**-23 * peak + _TINY


class Uniform8Bit(Codec):
    """256 uniform levels between the part's min and max: uint8 codes, float32 [min, scale].

    Error: scale / 2 (scale = (max - min) / 255) plus a float32-rounding epsilon.
    """

    name = "uniform8"

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        low, high = (v.reshape(1) for v in torch.aminmax(x))
        return _quantization_params(low, high, self.name)

    def encode(self, part: torch.Tensor) -> list[torch.Tensor]:
        x = _float32_part(part)
        if x.numel() == 0:
            return [torch.zeros(0, dtype=torch.uint8), torch.zeros(2, dtype=torch.float32)]
        low, _, scale = self._params(x)
        codes = torch.empty(x.numel(), dtype=torch.uint8, device=x.device)
        _quantize(x, low, scale, codes)
        return [_cpu(codes), _cpu(torch.cat([low, scale]))]

    def decode(self, encoded: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        numel = _check_numel(numel)
        specs = [("codes", torch.uint8, (numel,)), ("[min, scale]", torch.float32, (2,))]
        codes, params = _unpack(self.name, encoded, specs)
        _check_params(params[:1], params[1:], self.name)
        low, scale = params.tolist()
        return codes.to(torch.float32).mul_(scale).add_(low)

    def error_bound(self, part: torch.Tensor) -> float:
        x = _float32_part(part)
        if x.numel() == 0:
            return 0.0
        low, high, scale = self._params(x)
        return _bound(low, high, scale).item()

    def wire_bytes(self, numel: int) -> int:
        return _check_numel(numel) + 8


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
        x = _float32_part(part)
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
        return [_cpu(codes), _cpu(torch.stack([low, scale])), block]

    def decode(self, encoded: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        numel = _check_numel(numel)
        specs = [
            ("codes", torch.uint8, (numel,)),
            ("[mins; scales]", torch.float32, None),  # shape checked once block_size is known
            ("block_size", torch.int64, (1,)),
        ]
        codes, params, block = _unpack(self.name, encoded, specs)
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
        x = _float32_part(part)
        if x.numel() == 0:
            return 0.0
        low, high, scale = self._params(x)
        return _bound(low, high, scale).max().item()

    def wire_bytes(self, numel: int) -> int:
        numel = _check_numel(numel)
        return numel + 8 * -(-numel // self.block_size) + 8


# ---------------------------------------------------------------- choice and lookup

CODECS: dict[str, Callable[[], Codec]] = {
    NoCompression.name: NoCompression,
    Float16.name: Float16,
    ScaledFloat16.name: ScaledFloat16,
    Uniform8Bit.name: Uniform8Bit,
    Blockwise8Bit.name: Blockwise8Bit,
}


def codec_by_name(name: str) -> Codec:
    """A new codec of the given name (how a receiver decodes a part named on the wire)."""
    factory = CODECS.get(name) if isinstance(name, str) else None
    if factory is None:
        raise ValueError(f"unknown codec {name!r} (known: {', '.join(CODECS)})")
    return factory()


class AdaptiveCodec:
    """Chooses a codec per part: by the part's role when `by_role` names it, else by size
    (`large` from `threshold_numel` elements up, `small` below). The chosen codec's name goes on
    the wire, so every codec used must be registered in CODECS for receivers to decode it."""

    def __init__(self, small: Codec, large: Codec, threshold_numel: int, by_role: Mapping[str, Codec] | None = None):
        if isinstance(threshold_numel, bool) or not isinstance(threshold_numel, int) or threshold_numel < 0:
            raise ValueError(f"threshold_numel must be a non-negative integer, got {threshold_numel!r}")
        self.small, self.large, self.threshold_numel = small, large, threshold_numel
        self.by_role: dict[str, Codec] = dict(by_role or {})
        roles = [(f"by_role[{role!r}]", codec) for role, codec in self.by_role.items()]
        for where, codec in [("small", small), ("large", large), *roles]:
            if not isinstance(codec, Codec):
                raise ValueError(f"{where} must be a Codec, got {type(codec).__name__}")
            if codec.name not in CODECS:
                raise ValueError(f"{where} codec {codec.name!r} is not in CODECS, so receivers could not decode it")

    def choose(self, numel: int, role: str | None = None) -> Codec:
        """The codec for a part of `numel` elements playing `role` (e.g. "gradients")."""
        if role is not None and role in self.by_role:
            return self.by_role[role]
        return self.large if _check_numel(numel) >= self.threshold_numel else self.small

    def __repr__(self) -> str:
        return (f"AdaptiveCodec(small={self.small!r}, large={self.large!r}, "
                f"threshold_numel={self.threshold_numel}, by_role={self.by_role!r})")  # fmt: skip

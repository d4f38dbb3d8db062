"""The float codecs: `none` (float32 as is), `float16`, `scaled_float16` (standardized float16)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from apiary.averaging.compression.codec import (
    FLOAT16_MAX,
    FLOAT32_MAX,
    TINY,
    UNIT_ROUNDOFF,
    Codec,
    check_finite,
    check_numel,
    contiguous_cpu,
    float32_part,
    round_float32,
    unpack,
)


class NoCompression(Codec):
    """float32 as is: exact. encode/decode may share memory with their input (no copy)."""

    name = "none"

    def encode(self, part: torch.Tensor) -> list[torch.Tensor]:
        return [contiguous_cpu(float32_part(part))]

    def decode(self, encoded: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        numel = check_numel(numel)
        (values,) = unpack(self.name, encoded, [("values", torch.float32, (numel,))])
        return values

    def error_bound(self, part: torch.Tensor) -> float:
        float32_part(part)
        return 0.0

    def wire_bytes(self, numel: int) -> int:
        return 4 * check_numel(numel)


class Float16(Codec):
    """A cast to float16, with values beyond ±65504 clamped to ±65504.

    Error: max(2^-11 * min(M, 65504), 2^-25, M - 65504) where M = max|x|: half a float16 ulp
    (relative 2^-11, absolute 2^-25 among subnormals), or the clamp where |x| > 65504.
    """

    name = "float16"

    def encode(self, part: torch.Tensor) -> list[torch.Tensor]:
        x = float32_part(part)
        values = x.to(torch.float16)
        overflow = values.numel() and not all(math.isfinite(v.item()) for v in torch.aminmax(values))
        if overflow:  # values beyond ±65504, or inf/NaN in the part
            check_finite(x, self.name)
            values = x.clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16)
        return [contiguous_cpu(values)]

    def decode(self, encoded: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        numel = check_numel(numel)
        (values,) = unpack(self.name, encoded, [("values", torch.float16, (numel,))])
        return values.to(torch.float32)

    def error_bound(self, part: torch.Tensor) -> float:
        x = float32_part(part)
        if x.numel() == 0:
            return 0.0
        low, high = (v.item() for v in torch.aminmax(x))
        if not (math.isfinite(low) and math.isfinite(high)):
            check_finite(x, self.name)
        peak = max(-low, high)
        return max(2.0**-11 * min(peak, FLOAT16_MAX), 2.0**-25, peak - FLOAT16_MAX)

    def wire_bytes(self, numel: int) -> int:
        return 2 * check_numel(numel)


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
            check_finite(x, "scaled_float16")
            mean = round_float32(x.mean(dtype=torch.float64).item())
        low, high = (v.item() for v in torch.aminmax(x))
        spread = max(high - mean, mean - low)
        if spread > FLOAT32_MAX:
            raise ValueError(f"scaled_float16: values span {high - low:.3g}, beyond float32's range")
        centered = x.sub(mean)
        norm = torch.linalg.vector_norm(centered).item()
        if not math.isfinite(norm):  # the float32 sum of squares overflows
            norm = torch.linalg.vector_norm(centered, dtype=torch.float64).item()
        std = round_float32(norm / math.sqrt(x.numel()))
        return centered, mean, (std if std > 0 else 1.0), spread, max(abs(low), abs(high))

    def encode(self, part: torch.Tensor) -> list[torch.Tensor]:
        x = float32_part(part)
        if x.numel() == 0:
            return [torch.zeros(0, dtype=torch.float16), torch.tensor([0.0, 1.0], dtype=torch.float32)]
        centered, mean, std, _, _ = self._center(x)
        z = centered.div_(std).clamp_(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16)
        return [contiguous_cpu(z), torch.tensor([mean, std], dtype=torch.float32)]

    def decode(self, encoded: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        numel = check_numel(numel)
        specs = [("values", torch.float16, (numel,)), ("[mean, std]", torch.float32, (2,))]
        z, stats = unpack(self.name, encoded, specs)
        mean, std = stats.tolist()
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ValueError(f"scaled_float16: mean {mean} must be finite and std {std} finite and positive")
        return z.to(torch.float32).mul_(std).add_(mean)

    def error_bound(self, part: torch.Tensor) -> float:
        x = float32_part(part)
        if x.numel() == 0:
            return 0.0
        _, mean, std, spread, peak = self._center(x)
        rounding = max(2.0**-11 * spread, 2.0**-25 * std)  # half a float16 ulp, times std
        clamped = max(0.0, spread - FLOAT16_MAX * std)
        arithmetic = 4 * UNIT_ROUNDOFF * spread + 2 * UNIT_ROUNDOFF * (peak + abs(mean))  # float32 sub, div, mul, add
        return (rounding + clamped + arithmetic) * (1 + 1e-6) + TINY

    def wire_bytes(self, numel: int) -> int:
        return 2 * check_numel(numel) + 8

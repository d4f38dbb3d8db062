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
| quantile8      | uint8 codes of quantile buckets; float32 bucket means | 1 (+1024)         |

All codecs but `none` reject parts holding inf or NaN with a ValueError. `decode` checks the
structure of what a peer sent (count, dtypes, shapes, parameters) and raises ValueError for
anything malformed; it does not scan the values themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from apiary.averaging.compression.codec import Codec, check_numel
from apiary.averaging.compression.eight_bit import Blockwise8Bit, Uniform8Bit
from apiary.averaging.compression.floats import Float16, NoCompression, ScaledFloat16
from apiary.averaging.compression.quantile import Quantile8Bit

__all__ = ["CODECS", "AdaptiveCodec", "Blockwise8Bit", "Codec", "Float16", "NoCompression", "Quantile8Bit",
           "ScaledFloat16", "Uniform8Bit", "codec_by_name"]

CODECS: dict[str, Callable[[], Codec]] = {
    NoCompression.name: NoCompression,
    Float16.name: Float16,
    ScaledFloat16.name: ScaledFloat16,
    Uniform8Bit.name: Uniform8Bit,
    Blockwise8Bit.name: Blockwise8Bit,
    Quantile8Bit.name: Quantile8Bit,
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
        return self.large if check_numel(numel) >= self.threshold_numel else self.small

    def __repr__(self) -> str:
        return (f"AdaptiveCodec(small={self.small!r}, large={self.large!r}, "
                f"threshold_numel={self.threshold_numel}, by_role={self.by_role!r})")  # fmt: skip

"""Codec settings: the name of a codec of CODECS, or `adaptive` (chosen by the part's size).

An averager reads one such setting per role (gradient rounds, state rounds); each becomes an
`AdaptiveCodec` that picks the codec of a part. The chosen codec's name travels with every
part, and a reducer answers in the sender's codec, so peers of a group whose settings differ
still decode each other exactly as sent.
"""

from __future__ import annotations

from apiary.averaging.compression import CODECS, AdaptiveCodec, Float16, Quantile8Bit, codec_by_name

ADAPTIVE = "adaptive"
ADAPTIVE_THRESHOLD = 1 << 16  # adaptive: parts from this many elements up are sent as quantile8, smaller as float16


def codec_names() -> list[str]:
    """Every value a codec setting may take."""
    return [*CODECS, ADAPTIVE]


def codec_selection(name: str) -> AdaptiveCodec:
    """The selection a codec setting names: that codec for parts of every size, or for
    `adaptive` float16 below `ADAPTIVE_THRESHOLD` elements (small parts: bytes hardly matter,
    precision does) and quantile8 from there up. ValueError for an unknown name."""
    if name == ADAPTIVE:
        return AdaptiveCodec(Float16(), Quantile8Bit(), ADAPTIVE_THRESHOLD)
    if not isinstance(name, str) or name not in CODECS:
        raise ValueError(f"unknown codec {name!r} (known: {', '.join(codec_names())})")
    codec = codec_by_name(name)
    return AdaptiveCodec(codec, codec, 0)

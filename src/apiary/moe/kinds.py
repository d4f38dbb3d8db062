"""Expert kinds: what module an expert is and what one input looks like.

Built in: `ffn` (feed-forward), `transformer` (a transformer block over [batch, seq, hidden]),
and two kinds meant for tests: `slow` (sleeps `slow_seconds`, then behaves like `ffn`) and
`failing` (every pass raises). Any other kind is `package.module:factory`, where `factory` is
an `ExpertKind` or a callable `factory(hidden_size) -> nn.Module` taking [batch, hidden].
A kind's schema (`apiary.moe.schema`) says what its experts take and give: by default one
input of hidden size ([batch, hidden], or [batch, seq, hidden]) and an output of the same
shape; an `ExpertKind` may declare several positional and keyword inputs (the `transformer`
block takes an optional `padding_mask` keyword: bool [batch, seq], True where a position is
padding).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from apiary.moe.schema import ExpertSchema, TensorSchema

DEFAULT_SLOW_SECONDS = 1.0


class FeedForward(nn.Module):
    """hidden -> 4*hidden -> hidden with GELU in between."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """A small pre-norm transformer block over [batch, seq, hidden]."""

    def __init__(self, hidden: int, heads: int | None = None):
        super().__init__()
        heads = heads or max(1, hidden // 64)
        while hidden % heads:
            heads -= 1
        self.norm1 = nn.LayerNorm(hidden)
        self.attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden)
        self.ffn = FeedForward(hidden)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, key_padding_mask=padding_mask, need_weights=False)[0]
        return x + self.ffn(self.norm2(x))


def transformer_schema(hidden: int) -> ExpertSchema:
    """[batch, seq, hidden] and an optional bool `padding_mask` [batch, seq] in; [batch, seq, hidden] out."""
    return ExpertSchema((TensorSchema(("seq", hidden)), TensorSchema(("seq",), "bool", "padding_mask", optional=True)),
                        (TensorSchema(("seq", hidden)),))


class SlowFeedForward(FeedForward):
    """For tests: a feed-forward expert that first sleeps `delay` seconds on every pass."""

    def __init__(self, hidden: int, delay: float = DEFAULT_SLOW_SECONDS):
        super().__init__(hidden)
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return super().forward(x)


class FailingExpert(FeedForward):
    """For tests: an expert whose every pass fails (its server answers INTERNAL)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this expert is of the 'failing' test kind: every pass fails")


@dataclass(frozen=True)
class ExpertKind:
    """How to build an expert of one kind, and what its experts take and give: `schema(hidden_size)`,
    or (None) one input of `input_ndim` dimensions (2: [batch, hidden]; 3: [batch, seq, hidden])
    and an output of its shape."""

    factory: Callable[[int], nn.Module]
    input_ndim: int = 2
    schema: Callable[[int], ExpertSchema] | None = None

    def schema_for(self, hidden_size: int) -> ExpertSchema:
        if self.schema is not None:
            return self.schema(hidden_size)
        return ExpertSchema.same_shape(("seq",) * (self.input_ndim - 2) + (hidden_size,))


BUILT_IN_KINDS: dict[str, ExpertKind] = {
    "ffn": ExpertKind(FeedForward),
    "transformer": ExpertKind(TransformerBlock, 3, transformer_schema),
    "slow": ExpertKind(SlowFeedForward),
    "failing": ExpertKind(FailingExpert),
}


def resolve_kind(kind: str, *, slow_seconds: float = DEFAULT_SLOW_SECONDS) -> ExpertKind:
    """The kind named `kind`: a built-in name or `package.module:factory`. Raises ValueError
    naming the kind when it is unknown or cannot be imported."""
    if kind == "slow":
        return ExpertKind(partial(SlowFeedForward, delay=slow_seconds))
    if kind in BUILT_IN_KINDS:
        return BUILT_IN_KINDS[kind]
    module_name, colon, attribute = kind.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"unknown kind {kind!r} (built in: {', '.join(BUILT_IN_KINDS)}; "
                         f"or package.module:factory)")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"expert kind {kind!r} cannot be loaded: {e}") from None
    if isinstance(found, ExpertKind):
        return found
    if not callable(found):
        raise ValueError(f"expert kind {kind!r} is neither an ExpertKind nor a callable factory(hidden_size)")
    return ExpertKind(found)

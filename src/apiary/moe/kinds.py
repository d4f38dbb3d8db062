"""Expert kinds: what module an expert is and what one input looks like.

Built in: `ffn` (feed-forward), `transformer` (a transformer block over [batch, seq, hidden]),
and two kinds meant for tests: `slow` (sleeps `slow_seconds`, then behaves like `ffn`) and
`failing` (every pass raises). Any other kind is `package.module:factory`, where `factory` is
an `ExpertKind` or a callable `factory(hidden_size) -> nn.Module` taking [batch, hidden].
Every kind maps an input of hidden size to an output of the same shape.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.ffn(self.norm2(x))


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
    """How to build an expert of one kind, and the number of dimensions of its input
    (2: [batch, hidden]; 3: [batch, seq, hidden])."""

    factory: Callable[[int], nn.Module]
    input_ndim: int = 2


BUILT_IN_KINDS: dict[str, ExpertKind] = {
    "ffn": ExpertKind(FeedForward),
    "transformer": ExpertKind(TransformerBlock, 3),
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

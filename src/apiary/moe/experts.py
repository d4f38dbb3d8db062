"""Experts: torch modules that an expert server hosts and trains.

An `ExpertSpec` names an expert (e.g. "ffn.0.3"), its kind and its hidden size; `build_expert`
makes the module from the spec. An `Expert` pairs the module with its own optimizer: a forward
request only computes, a backward request recomputes the forward with grad, returns the
gradient of the inputs and applies one optimizer step (as in the DMoE paper, the requests
that flow through an expert are what trains it).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

INPUT_DTYPE = torch.float32


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


# kind -> (module factory, number of dimensions of one input, e.g. 2 = [batch, hidden])
EXPERT_KINDS: dict[str, tuple[Callable[[int], nn.Module], int]] = {
    "ffn": (FeedForward, 2),
    "transformer": (TransformerBlock, 3),
}


@dataclass(frozen=True)
class ExpertSpec:
    """What an expert is: its name (unique on the server), kind and hidden size."""

    name: str
    kind: str
    hidden_size: int

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an expert needs a name")
        if self.kind not in EXPERT_KINDS:
            raise ValueError(f"expert {self.name!r}: unknown kind {self.kind!r} (known: {', '.join(EXPERT_KINDS)})")
        if self.hidden_size <= 0:
            raise ValueError(f"expert {self.name!r}: hidden_size must be positive, got {self.hidden_size}")

    @property
    def input_ndim(self) -> int:
        return EXPERT_KINDS[self.kind][1]

    def describe_input(self) -> str:
        dims = ["batch", "seq"][: self.input_ndim - 1] + [str(self.hidden_size)]
        return f"float32[{', '.join(dims)}]"


def build_expert(spec: ExpertSpec) -> nn.Module:
    """A freshly initialised module of the spec's kind (seed torch first for reproducibility)."""
    factory, _ = EXPERT_KINDS[spec.kind]
    return factory(spec.hidden_size)


class Expert:
    """A hosted expert: module, optimizer, optional gradient clipping. Thread-safe: the runtime
    runs its batches in worker threads, one lock per expert keeps them from overlapping."""

    def __init__(self, spec: ExpertSpec, module: nn.Module | None = None, *, lr: float = 1e-3,
                 max_grad_norm: float | None = None):
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"expert {spec.name!r}: lr must be a finite non-negative number, got {lr}")
        self.spec = spec
        self.module = module if module is not None else build_expert(spec)
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=lr)
        self.max_grad_norm = max_grad_norm
        self.updates = 0
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.spec.name

    def check_inputs(self, inputs: Sequence[torch.Tensor]) -> None:
        """Raises ValueError naming the expert and what is wrong unless `inputs` fit its schema."""
        expected = self.spec.describe_input()
        if len(inputs) != 1:
            raise ValueError(f"expert {self.name!r} takes 1 input tensor ({expected}), got {len(inputs)}")
        x = inputs[0]
        if x.dtype != INPUT_DTYPE:
            raise ValueError(f"expert {self.name!r}: input dtype is {str(x.dtype).removeprefix('torch.')}, "
                             f"expected float32 ({expected})")
        if x.dim() != self.spec.input_ndim or x.shape[-1] != self.spec.hidden_size:
            raise ValueError(f"expert {self.name!r}: input shape is {list(x.shape)}, expected {expected}")
        if x.shape[0] == 0:
            raise ValueError(f"expert {self.name!r}: the input batch is empty")

    def check_grad_outputs(self, inputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor]) -> None:
        """Raises ValueError unless `grad_outputs` match the outputs the inputs give."""
        if len(grad_outputs) != 1:
            raise ValueError(f"expert {self.name!r}: backward takes 1 output gradient, got {len(grad_outputs)}")
        g = grad_outputs[0]
        if g.dtype != INPUT_DTYPE:
            raise ValueError(f"expert {self.name!r}: output gradient dtype is "
                             f"{str(g.dtype).removeprefix('torch.')}, expected float32")
        if g.shape != inputs[0].shape:  # both built-in kinds map hidden -> hidden
            raise ValueError(f"expert {self.name!r}: output gradient shape is {list(g.shape)}, "
                             f"expected {list(inputs[0].shape)} (the output's shape)")

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self.check_inputs(inputs)
        with self._lock, torch.no_grad():
            return [self.module(inputs[0])]

    def backward(self, inputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The gradients of the inputs; also one optimizer step on the expert's parameters."""
        self.check_inputs(inputs)
        self.check_grad_outputs(inputs, grad_outputs)
        with self._lock:
            x = inputs[0].detach().requires_grad_(True)
            with torch.enable_grad():
                output = self.module(x)
                self.optimizer.zero_grad(set_to_none=True)
                output.backward(grad_outputs[0])
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.updates += 1
            assert x.grad is not None
            return [x.grad]

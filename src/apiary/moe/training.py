"""How an expert trains: its optimizer and its learning-rate schedule.

`ExpertTraining` names the optimizer (`adam`, `adamw`, `sgd`, or `none`: the expert answers
input gradients but never changes), its learning rate, SGD's momentum and the weight decay,
gradient clipping, and the schedule: linear warm-up over `warmup_steps` updates, then the
learning rate stays (`constant`) or decays to zero at `total_steps` (`linear` or `cosine`).
The schedule follows the expert's update count, so a restored expert continues where it was.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

OptimizerName = Literal["adam", "adamw", "sgd", "none"]
SchedulerName = Literal["constant", "linear", "cosine"]
OPTIMIZERS: tuple[OptimizerName, ...] = ("adam", "adamw", "sgd", "none")
SCHEDULERS: tuple[SchedulerName, ...] = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class ExpertTraining:
    """An expert's optimizer and schedule; ValueError on an impossible combination."""

    optimizer: OptimizerName = "adam"
    lr: float = 1e-3
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    scheduler: SchedulerName = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None  # where `linear` and `cosine` reach zero

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r} (use {', '.join(OPTIMIZERS)})")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r} (use {', '.join(SCHEDULERS)})")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr must be a finite non-negative number, got {self.lr}")
        if not (0 <= self.momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(f"momentum is for sgd; the optimizer is {self.optimizer}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite non-negative number, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {self.max_grad_norm}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be non-negative, got {self.warmup_steps}")
        if self.scheduler != "constant" and (self.total_steps is None or self.total_steps <= self.warmup_steps):
            raise ValueError(f"the {self.scheduler} scheduler decays until total_steps, which must exceed "
                             f"warmup_steps={self.warmup_steps}; got {self.total_steps}")

    def make_optimizer(self, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer | None:
        """The optimizer over `parameters`, or None for `none`."""
        if self.optimizer == "none":
            return None
        if self.optimizer == "sgd":
            return torch.optim.SGD(parameters, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        optimizer_class = torch.optim.Adam if self.optimizer == "adam" else torch.optim.AdamW
        return optimizer_class(parameters, lr=self.lr, weight_decay=self.weight_decay)

    def learning_rate(self, updates: int) -> float:
        """The learning rate of the update after `updates` updates."""
        step = updates + 1
        if step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.scheduler == "constant":
            return self.lr
        assert self.total_steps is not None
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        if self.scheduler == "linear":
            return self.lr * (1.0 - progress)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

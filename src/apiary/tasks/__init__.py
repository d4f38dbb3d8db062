"""Training tasks: what a trainer trains, given by an entry point `package.module:factory`.

A factory takes keyword settings (`seed`: this peer's data seed; `model_seed`: shared by the run,
so every peer starts from the same weights) and returns a `Task`. Built-in tasks:
`apiary.tasks.charlm:task` (a character-level transformer language model on the standard
library's own source files; needs no download), `apiary.tasks.digits_moe:task` (a
mixture-of-experts classifier of scikit-learn's digits, its experts on expert servers) and
`apiary.tasks.moe_lm:task` (the flagship: a transformer language model on the whole standard
library whose every other feed-forward block is a mixture of experts on the swarm's expert
servers). A task whose experts live on expert servers describes them with `expert_grid(preset)`
(`task_expert_grid`: what `apiary expert-server --task NAME[:PRESET]` hosts).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

Batch = Any
BUILT_IN = {"charlm": "apiary.tasks.charlm:task", "digits_moe": "apiary.tasks.digits_moe:task",
            "moe_lm": "apiary.tasks.moe_lm:task"}


@dataclass
class Task:
    """A model, its training batches and loss, its optimizer, and a held-out evaluation."""

    model: torch.nn.Module
    batches: Iterator[Batch]  # endless
    loss: Callable[[torch.nn.Module, Batch], torch.Tensor]
    optimizer: Callable[[Any], torch.optim.Optimizer]
    batch_size: int
    evaluate: Callable[[torch.nn.Module], float] | None = None  # held-out loss


@dataclass(frozen=True)
class ExpertGrid:
    """The experts a task's expert servers host: `patterns` (as `--experts` takes them), their
    hidden size and kind."""

    patterns: str
    hidden_size: int
    kind: str


class TaskError(ValueError):
    """The task entry point cannot be loaded or does not give a Task."""


def load_task(entry_point: str, **settings: Any) -> Task:
    """Imports `package.module:factory` (or a built-in name) and calls it with `settings`."""
    target = BUILT_IN.get(entry_point, entry_point)
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise TaskError(f"task {entry_point!r} is not an entry point of the form package.module:factory "
                        f"(or a built-in task: {', '.join(BUILT_IN)})")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TaskError(f"task {entry_point!r}: cannot import {module_name!r}: {e}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise TaskError(f"task {entry_point!r}: {module_name} has no callable {attribute!r}")
    try:
        task = factory(**settings)
    except TypeError as e:
        raise TaskError(f"task {entry_point!r}: the factory does not take these settings: {e}") from None
    except ValueError as e:
        raise TaskError(f"task {entry_point!r}: {e}") from None
    if not isinstance(task, Task):
        raise TaskError(f"task {entry_point!r}: the factory returned {type(task).__name__}, not apiary.tasks.Task")
    return task


def task_expert_grid(spec: str) -> ExpertGrid:
    """The experts of the built-in task `spec` (`name` or `name:preset`). Raises TaskError naming
    the tasks that describe their experts, or the preset that is unknown."""
    name, _, preset = spec.partition(":")
    grids = {n: grid for n, target in BUILT_IN.items()
             if (grid := getattr(importlib.import_module(target.partition(":")[0]), "expert_grid", None))}
    if name not in grids:
        raise TaskError(f"task {name!r} describes no expert grid (built-in tasks that do: {', '.join(grids)})")
    try:
        return grids[name](*([preset] if preset else []))
    except ValueError as e:
        raise TaskError(f"task {spec!r}: {e}") from None

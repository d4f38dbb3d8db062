"""A model's and optimizer's state as a flat list of tensors plus msgpack-able metadata.

This is what a peer publishes for newcomers, downloads when it joins or falls behind, and
averages every few epochs. The optimizer's state is laid out in a fixed order (parameter by
parameter, key by key); values that are not tensors (and tensors such as Adam's step count)
travel in the metadata so that only floating-point statistics are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from apiary.optim.rules import UpdateRule


def parameters_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_statistics(optimizer: torch.optim.Optimizer) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """(layout, tensors): every floating-point state tensor with as many elements as its
    parameter goes into `tensors` (averageable); anything else is kept in `layout`."""
    layout: list[dict[str, Any]] = []
    tensors: list[torch.Tensor] = []
    for param in parameters_of(optimizer):
        entry: dict[str, Any] = {}
        for key, value in sorted(optimizer.state.get(param, {}).items()):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == param.shape:
                entry[key] = {"tensor": len(tensors)}
                tensors.append(value)
            elif isinstance(value, torch.Tensor):
                entry[key] = {"value": value.detach().cpu().tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
            else:
                entry[key] = {"value": value}
        layout.append(entry)
    return layout, tensors


def load_optimizer_statistics(optimizer: torch.optim.Optimizer, layout: Sequence[dict[str, Any]],
                              tensors: Sequence[torch.Tensor]) -> None:
    """Restores what `optimizer_statistics` gave (raises ValueError if it does not fit)."""
    params = parameters_of(optimizer)
    if len(layout) != len(params):
        raise ValueError(f"the optimizer state is for {len(layout)} parameters, this optimizer has {len(params)}")
    for param, entry in zip(params, layout):
        state: dict[str, Any] = {}
        for key, item in entry.items():
            if "tensor" in item:
                value = tensors[int(item["tensor"])]
                if value.shape != param.shape:
                    raise ValueError(f"optimizer state {key!r} has shape {list(value.shape)}, "
                                     f"its parameter {list(param.shape)}")
                state[key] = value.detach().to(param.device, param.dtype if value.is_floating_point() else value.dtype,
                                               copy=True)
            elif "dtype" in item:
                state[key] = torch.tensor(item["value"], dtype=getattr(torch, item["dtype"]))
            else:
                state[key] = item["value"]
        if state:
            optimizer.state[param] = state
        else:
            optimizer.state.pop(param, None)


def run_state(rule: UpdateRule, epoch: int) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """(metadata, tensors) of a peer's state at `epoch`: the rule's synced parameters, then its
    optimizer's statistics."""
    optimizer, params = rule.synced()
    layout, statistics = optimizer_statistics(optimizer)
    return {"epoch": epoch, "mode": rule.mode, "layout": layout}, [*params, *statistics]


def load_run_state(rule: UpdateRule, metadata: dict[str, Any], tensors: Sequence[torch.Tensor]) -> int:
    """Takes a state `run_state` gave (this peer's or another's) into `rule`; its epoch. Raises
    ValueError if it does not fit."""
    optimizer, params = rule.synced()
    if metadata.get("mode") != rule.mode:
        raise ValueError(f"the state is of mode {metadata.get('mode')!r}, this optimizer runs {rule.mode!r}")
    if len(tensors) < len(params) or any(t.shape != p.shape for t, p in zip(tensors, params)):
        raise ValueError("the state's parameters do not match this model's shapes")
    rule.take(params, tensors)
    load_optimizer_statistics(optimizer, metadata["layout"], tensors[len(params):])
    return int(metadata["epoch"])

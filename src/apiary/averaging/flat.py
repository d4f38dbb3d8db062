"""Tensors as one float32 vector and back: how the averager hands them to the all-reduce, and
how the trainer's shared-memory segment holds them (torch only, so the trainer's client can
use it without loading the averager)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def flatten(tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensors' values as one float32 vector (written into `out` if it has the right size)."""
    if not tensors:
        return torch.zeros(0)
    parts = [t.detach().reshape(-1).to(torch.float32) for t in tensors]
    if out is not None and out.numel() == sum(p.numel() for p in parts):
        return torch.cat(parts, out=out)
    return torch.cat(parts)


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Writes `flat` back into `tensors` (in place, casting to each tensor's dtype)."""
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            count = tensor.numel()
            tensor.copy_(flat[offset : offset + count].view_as(tensor))
            offset += count

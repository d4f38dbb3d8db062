"""Keeping NaN and infinity out of an expert: the check its server makes on every tensor.

A NaN or an infinity that reaches an expert's backward pass becomes its optimizer's step, and
from then on the expert answers non-finite outputs to every trainer. `all_finite` is the cheap
test the server runs on each tensor it receives and sends: one fused min/max pass over the
tensor (a NaN propagates to both, an infinity shows in one), on the CPU or any device.
"""

from __future__ import annotations

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """True unless `tensor` holds a NaN or an infinity (an empty tensor is finite)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))

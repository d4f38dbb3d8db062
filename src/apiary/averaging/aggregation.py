"""How a reducer combines the parts its group's senders sent for its span.

The plain weighted mean is fast (parts are folded into a running sum as they arrive) but one
peer that sends huge values moves it anywhere. The robust rules keep every part until the span
is complete, then combine them so that a minority of outliers moves the result only a bounded
distance:

- `centered_clip`: CenteredClip, from "Secure Distributed Training at Scale" (Gorbunov et al.,
  2022). Starting from the coordinate-wise median, each iteration moves the centre by the
  weighted mean of the parts' offsets from it, each offset clipped to norm `clip_radius`:
  v <- v + sum_i w_i * (x_i - v) * min(1, radius / |x_i - v|) / sum_i w_i.
  A part within `radius` of the centre counts fully; one farther away pulls by `radius` at most.
- `trimmed_mean`: per coordinate, the weighted mean of the values left once `trim_fraction` of
  the total weight is cut from each end (the lowest and the highest values).

Weights are the senders' claimed weights: bounding what a peer may claim is up to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

_CONVERGED = 1e-4  # CenteredClip stops once a step moves the centre less than this times the radius


class Aggregation(str, Enum):
    MEAN = "mean"
    CENTERED_CLIP = "centered_clip"
    TRIMMED_MEAN = "trimmed_mean"


@dataclass(frozen=True)
class Aggregator:
    """A reducer's rule for combining parts, with its parameters."""

    kind: Aggregation = Aggregation.MEAN
    clip_radius: float = 1.0
    clip_iterations: int = 20
    trim_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not self.clip_radius > 0:
            raise ValueError(f"clip_radius must be positive, got {self.clip_radius}")
        if self.clip_iterations < 1:
            raise ValueError(f"clip_iterations must be at least 1, got {self.clip_iterations}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")

    @property
    def robust(self) -> bool:
        """Whether the rule needs every part at once (the mean folds them in as they arrive)."""
        return self.kind is not Aggregation.MEAN

    def combine(self, parts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Combines `parts` (senders x elements, float32) weighted by `weights` (one per sender)."""
        if self.kind is Aggregation.CENTERED_CLIP:
            return centered_clip(parts, weights, self.clip_radius, self.clip_iterations)
        if self.kind is Aggregation.TRIMMED_MEAN:
            return trimmed_mean(parts, weights, self.trim_fraction)
        return weighted_mean(parts, weights)


def _checked(parts: torch.Tensor, weights: torch.Tensor) -> float:
    if parts.dim() != 2 or weights.shape != (parts.shape[0],):
        raise ValueError(f"parts must be senders x elements with one weight each, got {tuple(parts.shape)} "
                         f"and {tuple(weights.shape)} weights")
    if parts.shape[0] == 0:
        raise ValueError("no parts to combine")
    if bool((weights < 0).any()):
        raise ValueError("weights must be non-negative")
    return float(weights.sum())


def weighted_mean(parts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i x_i / sum_i w_i (zeros when every weight is zero)."""
    total = _checked(parts, weights)
    if total <= 0:
        return torch.zeros(parts.shape[1], dtype=parts.dtype)
    return weights.to(parts.dtype) @ parts / total


def centered_clip(parts: torch.Tensor, weights: torch.Tensor, radius: float, iterations: int) -> torch.Tensor:
    """CenteredClip from the weighted parts' coordinate-wise median, at most `iterations` steps."""
    total = _checked(parts, weights)
    if total <= 0:
        return torch.zeros(parts.shape[1], dtype=parts.dtype)
    weights = weights.to(parts.dtype)
    centre = parts[weights > 0].median(dim=0).values
    for _ in range(iterations):
        offsets = parts - centre
        norms = offsets.norm(dim=1)
        scale = torch.clamp(radius / norms.clamp_min(torch.finfo(parts.dtype).tiny), max=1.0)
        step = (weights * scale) @ offsets / total
        centre = centre + step
        if float(step.norm()) <= _CONVERGED * radius:
            break
    return centre


def trimmed_mean(parts: torch.Tensor, weights: torch.Tensor, trim_fraction: float) -> torch.Tensor:
    """Per coordinate, the weighted mean of the values within the central (1 - 2 * trim_fraction)
    of the weight; a value straddling a cut counts with the weight inside it. With equal weights
    and trim_fraction * senders whole, that drops that many values at each end."""
    total = _checked(parts, weights)
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    if total <= 0:
        return torch.zeros(parts.shape[1], dtype=parts.dtype)
    values, order = parts.sort(dim=0)
    sorted_weights = weights.to(parts.dtype)[order]
    upper = sorted_weights.cumsum(dim=0)
    lower = upper - sorted_weights
    low, high = trim_fraction * total, (1 - trim_fraction) * total
    kept = (torch.clamp(upper, max=high) - torch.clamp(lower, min=low)).clamp_min(0)
    return (values * kept).sum(dim=0) / kept.sum(dim=0)

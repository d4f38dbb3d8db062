"""The maths of the robust aggregators (`apiary.averaging.aggregation`), and a reducer's span
combining its senders' parts with them (`apiary.averaging.allreduce`)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from apiary.averaging.aggregation import Aggregation, Aggregator, centered_clip, trimmed_mean, weighted_mean
from apiary.averaging.allreduce import GroupRound, _SpanReduction
from apiary.averaging.spans import Member, Role
from apiary.wire import InvalidRequest


def honest_and_attackers(honest: int = 13, attackers: int = 3, dim: int = 40, seed: int = 0,
                         spread: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """Honest parts around a common gradient, then attackers sending it sign-flipped x1000."""
    generator = torch.Generator().manual_seed(seed)
    gradient = torch.randn(dim, generator=generator)
    good = gradient + spread * torch.randn(honest, dim, generator=generator)
    bad = -1000 * gradient.expand(attackers, dim)
    return torch.cat([good, bad]), good.mean(dim=0)


def test_weighted_mean() -> None:
    parts = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert torch.allclose(weighted_mean(parts, torch.tensor([1.0, 3.0])), torch.tensor([2.5, 5.0]))
    assert torch.equal(weighted_mean(parts, torch.zeros(2)), torch.zeros(2))


def test_centered_clip_equals_the_mean_when_every_part_is_within_the_radius() -> None:
    parts = torch.randn(8, 20, generator=torch.Generator().manual_seed(1)) * 0.01
    weights = torch.arange(1.0, 9.0)
    assert torch.allclose(centered_clip(parts, weights, radius=10.0, iterations=5), weighted_mean(parts, weights),
                          atol=1e-6)


def test_centered_clip_ignores_a_minority_of_huge_outliers() -> None:
    parts, honest_mean = honest_and_attackers()
    weights = torch.ones(len(parts))
    radius = 0.5
    clipped = centered_clip(parts, weights, radius=radius, iterations=50)
    # honest parts lie within the radius of the centre, so at the fixed point their 13 unclipped
    # offsets balance the 3 outliers' pulls of `radius` each: the centre is 3/13 radius off at most
    assert float((clipped - honest_mean).norm()) <= 3 / 13 * radius + 1e-3
    assert float((weighted_mean(parts, weights) - honest_mean).norm()) > 100


def test_centered_clip_reaches_its_fixed_point() -> None:
    parts, _ = honest_and_attackers(seed=3)
    weights = torch.rand(len(parts), generator=torch.Generator().manual_seed(4)) + 0.5
    radius = 0.3
    centre = centered_clip(parts, weights, radius=radius, iterations=200)
    offsets = parts - centre
    scale = torch.clamp(radius / offsets.norm(dim=1), max=1.0)
    residual = (weights * scale) @ offsets / weights.sum()  # the step CenteredClip would take next
    assert float(residual.norm()) < 1e-3 * radius


def test_trimmed_mean_drops_the_extremes_of_each_coordinate() -> None:
    parts = torch.randn(10, 30, generator=torch.Generator().manual_seed(5))
    expected = parts.sort(dim=0).values[2:8].mean(dim=0)
    assert torch.allclose(trimmed_mean(parts, torch.ones(10), 0.2), expected, atol=1e-6)
    assert torch.allclose(trimmed_mean(parts, torch.ones(10), 0.0), parts.mean(dim=0), atol=1e-6)


def test_trimmed_mean_weight_counts_like_repetition() -> None:
    parts = torch.randn(5, 12, generator=torch.Generator().manual_seed(6))
    weights = torch.tensor([1.0, 3.0, 1.0, 2.0, 1.0])
    repeated = torch.repeat_interleave(parts, weights.long(), dim=0)
    assert torch.allclose(trimmed_mean(parts, weights, 0.25), trimmed_mean(repeated, torch.ones(8), 0.25), atol=1e-6)


def test_trimmed_mean_resists_outliers_up_to_the_trimmed_share() -> None:
    parts, honest_mean = honest_and_attackers()
    result = trimmed_mean(parts, torch.ones(len(parts)), 0.2)  # 3.2 of 16 cut from each end
    assert float((result - honest_mean).abs().max()) < 0.2


@pytest.mark.parametrize("kwargs, message", [
    ({"clip_radius": 0.0}, "clip_radius"),
    ({"clip_iterations": 0}, "clip_iterations"),
    ({"trim_fraction": 0.5}, "trim_fraction"),
])  # fmt: skip
def test_aggregator_refuses_bad_parameters(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Aggregator(Aggregation.CENTERED_CLIP, **kwargs)  # type: ignore[arg-type]


def test_aggregators_refuse_negative_weights_and_misshaped_parts() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        weighted_mean(torch.ones(2, 3), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="one weight each"):
        centered_clip(torch.ones(2, 3), torch.ones(3), 1.0, 1)


def _round(senders: int, aggregator: Aggregator) -> GroupRound:
    members = [Member(f"peer{i:02d}" + "x" * 44, f"127.0.0.1:{1000 + i}", Role.NODE, 1e8) for i in range(senders)]
    return GroupRound("group", members, 0, 40 * senders, sender_timeout=5.0, aggregator=aggregator)


async def test_a_reducer_combines_its_span_with_the_robust_aggregator() -> None:
    parts, honest_mean = honest_and_attackers()
    aggregator = Aggregator(Aggregation.CENTERED_CLIP, clip_radius=0.5, clip_iterations=50)
    round_ = _round(len(parts), aggregator)
    reduction = _SpanReduction(round_, 40)
    scratch = torch.empty(40)  # parts arrive in a reused buffer: the reduction must copy them
    for member, part in zip(round_.members, parts):
        scratch.copy_(part)
        reduction.add(member.peer_id, scratch, 1.0)
    result = await asyncio.wait_for(reduction.result(), 5)
    assert torch.allclose(result, centered_clip(parts, torch.ones(len(parts)), 0.5, 50))
    assert float((result - honest_mean).norm()) < 0.2


async def test_a_robust_reducer_refuses_non_finite_parts_and_combines_the_rest_at_the_timeout() -> None:
    round_ = _round(3, Aggregator(Aggregation.TRIMMED_MEAN, trim_fraction=0.0))
    round_.sender_timeout = 0.2
    reduction = _SpanReduction(round_, 40)
    reduction.add(round_.members[0].peer_id, torch.full((40,), 1.0), 1.0)
    with pytest.raises(InvalidRequest, match="non-finite"):
        reduction.add(round_.members[1].peer_id, torch.full((40,), float("nan")), 1.0)
    reduction.add(round_.members[2].peer_id, torch.full((40,), 3.0), 1.0)
    result = await asyncio.wait_for(reduction.result(), 5)  # member 1 never contributes
    assert torch.allclose(result, torch.full((40,), 2.0))

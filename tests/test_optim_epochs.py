"""The optimizer's epochs without processes or timing: the epoch controller's decisions, the update
rules against plain torch, and the optimizer driven against an in-memory swarm whose progress,
rounds and state each test sets."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from apiary.dht import DHTNode
from apiary.optim import Optimizer, SwarmProgress
from apiary.optim.epochs import Decision, EpochController, LocalProgress, Step
from apiary.optim.progress import ProgressTracker
from apiary.optim.rules import DiLoCo, GradientAveraging, LocalSGD
from apiary.wire import PeerAddress

TARGET = 100


def view(epoch: int = 0, reported: float = 0.0, peers: int = 2, speed: float = 0.0) -> SwarmProgress:
    """What the other peers reported toward `epoch` (no extrapolation unless `speed`)."""
    return SwarmProgress(epoch, reported, reported, speed, peers, time.monotonic())


# ---- the controller

controller = EpochController(TARGET)


def decide(local: LocalProgress, seen: SwarmProgress | None, prepared: int = -1, fresh: bool = False) -> Decision:
    return controller.after_batch(local, seen, prepared, time.monotonic(), fresh)


def test_an_epoch_goes_on_until_the_estimate_reaches_the_target_then_ends_on_reported_counts():
    assert decide(LocalProgress(0, 40), view(0, 50)) == Decision(Step.CONTINUE, 0)
    assert decide(LocalProgress(0, 40), view(0, 60)) == Decision(Step.REFRESH, 0)
    assert decide(LocalProgress(0, 40), view(0, 60), fresh=True) == Decision(Step.FINISH, 0)
    assert decide(LocalProgress(0, 100), None) == Decision(Step.REFRESH, 0)  # alone: own samples
    assert decide(LocalProgress(0, 100), None, fresh=True) == Decision(Step.FINISH, 0)


def test_an_extrapolated_estimate_asks_for_fresh_counts_but_never_ends_the_epoch():
    racing = SwarmProgress(0, 10.0, 10.0, 1000.0, 2, time.monotonic() - 1.0)  # 1000 samples/s for a second
    assert decide(LocalProgress(0, 40), racing) == Decision(Step.REFRESH, 0)
    assert decide(LocalProgress(0, 40), racing, fresh=True) == Decision(Step.CONTINUE, 0)


def test_a_peer_behind_the_swarm_catches_up_to_its_epoch():
    assert decide(LocalProgress(2, 90), view(5)) == Decision(Step.CATCH_UP, 5)
    assert decide(LocalProgress(2, 90), view(3)) == Decision(Step.CATCH_UP, 3)  # no group formed ahead


def test_a_group_formed_ahead_for_the_epoch_the_swarm_just_ended_is_finished_not_caught_up():
    assert decide(LocalProgress(2, 30), view(3), prepared=2) == Decision(Step.FINISH, 2)
    assert decide(LocalProgress(2, 30), view(4), prepared=2) == Decision(Step.CATCH_UP, 4)  # more than one behind
    assert decide(LocalProgress(2, 30), view(3), prepared=1) == Decision(Step.CATCH_UP, 3)  # an older group


def test_an_auxiliary_peer_follows_the_swarm_and_joins_a_round_when_the_target_is_reported():
    assert controller.assist(0, None, -1) == (0, False)
    assert controller.assist(0, view(4, 30), -1) == (4, False)
    assert controller.assist(4, view(4, 100), -1) == (4, True)
    assert controller.assist(4, view(5, 0), 4) == (4, True)  # the round it prepared for


def test_a_group_is_formed_ahead_once_the_end_is_as_near_as_matchmaking_and_once_per_epoch():
    now = time.monotonic()
    local = LocalProgress(3, 20, samples_per_second=10.0)
    seen = SwarmProgress(3, 40.0, 40.0, 10.0, 2, now)  # 40 samples to go at 20 samples/s: 2 s
    assert not controller.preparation_due(local, seen, 2, matchmaking_seconds=1.0, now=now)
    assert controller.preparation_due(local, seen, 2, matchmaking_seconds=2.5, now=now)
    assert not controller.preparation_due(local, seen, 3, matchmaking_seconds=2.5, now=now)  # already asked
    alone = SwarmProgress(3, 40.0, 40.0, 10.0, 1, now)
    assert not controller.preparation_due(local, alone, 2, matchmaking_seconds=2.5, now=now)
    averaging = LocalProgress(3, 20, samples_per_second=10.0, training=False)
    assert not controller.preparation_due(averaging, seen, 2, matchmaking_seconds=2.5, now=now)


def test_refreshes_quicken_as_the_end_nears():
    now = time.monotonic()
    far = SwarmProgress(0, 0.0, 0.0, 1.0, 2, now)
    near = SwarmProgress(0, 79.0, 79.0, 10.0, 2, now)
    assert controller.refresh_interval(LocalProgress(0, 0, 1.0), far, now) == controller.refresh_period
    assert controller.refresh_interval(LocalProgress(0, 0, 10.0), near, now) == pytest.approx(0.05)


def test_throughput_is_a_moving_average_that_restarts_after_a_pause():
    local = LocalProgress(0).counted(8, None)
    assert (local.samples, local.samples_per_second) == (8, 0.0)
    local = local.counted(8, 0.1).counted(8, 0.2)
    assert local.samples == 24 and local.samples_per_second == pytest.approx(0.8 * 80 + 0.2 * 40)
    assert LocalProgress(0, 5, 20.0, training=False).published_speed == 0.0


@pytest.fixture
async def nodes():
    first = await DHTNode.launch()
    others = [await DHTNode.launch([PeerAddress.parse(first.address)]) for _ in range(2)]
    yield [first, *others]
    for node in [first, *others]:
        await node.shutdown()


async def test_a_liars_counts_cannot_end_the_epoch_because_the_tracker_bounds_them(nodes):
    """The controller trusts `reported` counts: what keeps a liar from ending an epoch is the
    ProgressTracker's bound on them (optim/progress.py), which this test relies on."""
    me, honest, liar = (ProgressTracker(node, "liars", node.identity.peer_id) for node in nodes)
    target = 10_000
    local = LocalProgress(0, 100, samples_per_second=10.0)
    await me.publish(0, local.samples, local.samples_per_second)
    await honest.publish(0, 100, 10.0)
    await liar.publish(10**6, 10**9, 1e9)
    seen = await me.fetch()
    assert seen.epoch == 0, "one peer alone moved the swarm's epoch"
    assert EpochController(target).after_batch(local, seen, -1, time.monotonic(), fresh=True).step is Step.CONTINUE

    await liar.publish(0, 10**9, 1e9)
    seen = await me.fetch()
    assert seen.peers == 3 and seen.reported < target / 10, seen
    assert EpochController(target).after_batch(local, seen, -1, time.monotonic(), fresh=True).step is Step.CONTINUE
    # the same counts unbounded would have ended the epoch at once
    unbounded = SwarmProgress(0, 10**9 + 100, 10**9 + 100, seen.samples_per_second, 3, seen.fetched_at)
    assert EpochController(target).after_batch(local, unbounded, -1, time.monotonic(), fresh=True).step is Step.FINISH


# ---- the update rules against plain torch


class Peers:
    """`Rounds` in which this peer meets others whose tensors and weights a test gives (round by
    round); a round not given finds no group."""

    def __init__(self, others: dict[int, list[tuple[list[torch.Tensor], float]]] | None = None):
        self.others = others or {}
        self.started: list[tuple[int, float]] = []
        self.futures: list[concurrent.futures.Future[int | None]] = []
        self.hold = False  # rounds end when the test sets their futures' results

    def start(self, tensors: list[torch.Tensor], weight: float, round_index: int) -> concurrent.futures.Future:
        self.started.append((round_index, weight))
        future: concurrent.futures.Future[int | None] = concurrent.futures.Future()
        self.futures.append(future)
        if not self.hold:
            future.set_result(self.average(tensors, weight, round_index))
        return future

    def average(self, tensors: list[torch.Tensor], weight: float, round_index: int) -> int | None:
        others = self.others.get(round_index)
        if not others:
            return None
        total = weight + sum(w for _, w in others)
        for index, tensor in enumerate(tensors):
            tensor.copy_((tensor * weight + sum(o[index] * w for o, w in others)) / total)
        return 1 + len(others)

    def result(self, future: concurrent.futures.Future, what: str) -> int | None:
        return future.result(5)


def _model(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def _backward(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, generator=generator)
    model.zero_grad()
    ((model(x) - 1) ** 2).mean().backward()


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _sgd(params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def test_gradient_averaging_steps_the_wrapped_optimizer_on_the_samples_weighted_mean_gradient():
    model, reference = _model(), _model()
    other = [torch.full_like(p, 0.5) for p in model.parameters()]  # another peer's mean gradient, 30 samples
    rule = GradientAveraging(list(model.parameters()), _sgd(list(model.parameters())), None, Peers({0: [(other, 30)]}))
    batches = [(1, 8), (2, 2)]  # (seed, samples)
    seen = []
    for seed, samples in batches:
        _backward(model, seed)
        seen.append(_grads(model))
        rule.on_batch(samples)
    rule.finish_epoch(0, 10)

    mine = [(a * 8 + b * 2) / 10 for a, b in zip(*seen)]
    for p, g, o in zip(reference.parameters(), mine, other):
        p.grad = (g * 10 + o * 30) / 40
    _sgd(list(reference.parameters())).step()
    for got, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, expected)
    assert all(not buffer.any() for buffer in rule.accumulated)


def test_gradient_averaging_of_a_lone_peer_is_the_wrapped_optimizer_on_its_mean_gradient_and_the_scheduler_steps():
    model, reference = _model(), _model()
    optimizer = _sgd(list(model.parameters()))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    rule = GradientAveraging(list(model.parameters()), optimizer, scheduler, Peers())
    _backward(model, 1)
    rule.on_batch(4)
    rule.finish_epoch(0, 4)
    _backward(reference, 1)
    _sgd(list(reference.parameters())).step()
    for got, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, expected)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_delayed_gradient_updates_land_when_their_round_ends():
    model = _model()
    peers = Peers()
    peers.hold = True
    rule = GradientAveraging(list(model.parameters()), _sgd(list(model.parameters())), None, peers, delay_updates=True)
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model, 1)
    rule.on_batch(4)
    rule.finish_epoch(0, 4)
    rule.poll()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), "applied before the round ended"
    peers.futures[0].set_result(None)
    rule.poll()
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_diloco_applies_an_outer_nesterov_step_to_the_mean_pseudo_gradient():
    model = _model()
    start = [p.detach().clone() for p in model.parameters()]
    other = [torch.full_like(p, 0.2) for p in model.parameters()]  # another peer's pseudo-gradient, 10 samples
    inner = torch.optim.SGD(model.parameters(), lr=0.5)
    rule = DiLoCo(list(model.parameters()), inner, None, Peers({0: [(other, 10)]}), outer_lr=0.7, outer_momentum=0.9)
    for seed in (1, 2):
        _backward(model, seed)
        rule.on_batch(4)
    after_inner = [p.detach().clone() for p in model.parameters()]
    rule.finish_epoch(0, 10)
    for got, s, a, o in zip(model.parameters(), start, after_inner, other):
        mean = ((s - a) * 10 + o * 10) / 20
        # Nesterov SGD's first step: the buffer is the gradient, the update gradient + momentum x buffer
        torch.testing.assert_close(got, s - 0.7 * (1 + 0.9) * mean)
    torch.testing.assert_close(list(rule.synced()[1]), list(model.parameters()))


def test_diloco_after_joining_mid_epoch_contributes_nothing_once():
    model = _model()
    peers = Peers()
    rule = DiLoCo(list(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.5), None, peers)
    rule.drop()
    _backward(model, 1)
    rule.on_batch(4)
    rule.finish_epoch(0, 4)
    _backward(model, 2)
    rule.on_batch(4)
    rule.finish_epoch(1, 4)
    assert peers.started == [(0, 0.0), (1, 4.0)]


def test_local_sgd_steps_every_batch_and_averages_parameters_at_the_epoch():
    model, theirs = _model(0), _model(1)
    rule = LocalSGD(list(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.5), None, Peers())
    start = [p.detach().clone() for p in model.parameters()]
    _backward(model, 1)
    rule.on_batch(4)
    assert all(not torch.equal(p, s) for p, s in zip(model.parameters(), start))
    mine = [p.detach().clone() for p in model.parameters()]
    rule.rounds = Peers({0: [([s - t.detach() for s, t in zip(start, theirs.parameters())], 4)]})
    rule.finish_epoch(0, 4)
    for got, a, b in zip(model.parameters(), mine, theirs.parameters()):
        torch.testing.assert_close(got, (a + b) / 2)


# ---- the optimizer against an in-memory swarm


class MemorySwarm:
    """A `Swarm` kept in memory: the test sets the swarm's progress (`view`), the state peers give
    (`state`), the others' tensors per round (`others`, as `Peers`), whether groups form ahead."""

    def __init__(self) -> None:
        self.peer_id, self.client_mode, self.dht_address, self.averaged_bytes = "me", False, None, 0
        self.last_outcome = None
        self.matchmaking_seconds = 0.0
        self.view = SwarmProgress(0, 0.0, 0.0, 0.0, 1, time.monotonic())
        self.state: tuple[dict[str, Any], list[torch.Tensor]] | None = None
        self.loads = 0
        self.peers = Peers()
        self.rounds: list[tuple[int, float]] = []
        self.prepare_ahead = False
        self.prepared = threading.Event()
        self.published: list[tuple[int, int, float]] = []

    async def publish_progress(self, epoch: int, samples: int, samples_per_second: float) -> bool:
        self.published.append((epoch, samples, samples_per_second))
        return True

    async def fetch_progress(self) -> SwarmProgress:
        return self.view

    async def register(self, tensors: Sequence[torch.Tensor]) -> None:
        pass

    async def prepare(self, tensors: Sequence[torch.Tensor], round_index: int) -> bool:
        if self.prepare_ahead:
            self.prepared.set()
        return self.prepare_ahead

    async def average(self, tensors: Sequence[torch.Tensor], weight: float, round_index: int) -> int | None:
        self.rounds.append((round_index, weight))
        return self.peers.average(list(tensors), weight, round_index)

    async def publish_state(self, metadata: dict[str, Any], tensors: Sequence[torch.Tensor]) -> None:
        pass

    async def load_state(self, timeout: float) -> tuple[dict[str, Any], list[torch.Tensor]] | None:
        self.loads += 1
        return self.state

    async def close(self) -> None:
        pass


def _optimizer(model: torch.nn.Module, swarm: MemorySwarm, **options: Any) -> Optimizer:
    return Optimizer("memory", model.parameters(), lambda p: torch.optim.SGD(p, lr=0.1), target_batch_size=TARGET,
                     swarm=swarm, average_state_every=0, **options)


def _set_view(opt: Optimizer, swarm: MemorySwarm, seen: SwarmProgress) -> None:
    swarm.view = seen
    assert opt.refresh() is seen


def _batch(opt: Optimizer, model: torch.nn.Module, samples: int = 10, seed: int = 1) -> bool:
    _backward(model, seed)
    return opt.step(samples)


def _state_of(model: torch.nn.Module, epoch: int) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """What a peer of another run gives: its parameters at `epoch` (SGD without momentum: no statistics)."""
    params = [p.detach().clone() for p in model.parameters()]
    return {"epoch": epoch, "mode": "gradients", "layout": [{}, {}]}, params


def _same(model: torch.nn.Module, tensors: Sequence[torch.Tensor]) -> bool:
    return all(torch.equal(p, t) for p, t in zip(model.parameters(), tensors))


def test_a_late_peer_loads_the_swarms_state_before_training():
    swarm = MemorySwarm()
    swarm.state = _state_of(_model(7), epoch=6)
    model = _model()
    with _optimizer(model, swarm) as opt:
        assert swarm.loads == 1 and opt.epoch == 6
        assert _same(model, swarm.state[1])


def test_a_peer_that_fell_behind_loads_the_state_drops_what_it_accumulated_and_follows():
    swarm = MemorySwarm()
    model = _model()
    with _optimizer(model, swarm) as opt:
        _set_view(opt, swarm, view(0, 20))
        assert not _batch(opt, model)
        swarm.state = _state_of(_model(7), epoch=3)
        _set_view(opt, swarm, view(4, 10))  # the swarm finished epoch 3 while we computed
        assert _batch(opt, model)
        assert swarm.loads == 2 and opt.epoch == 4 and opt.samples == 0 and swarm.rounds == []
        assert all(not buffer.any() for buffer in opt.rule.accumulated)
        assert _same(model, swarm.state[1])
        swarm.state = None  # no state comes: it follows the swarm's epoch all the same
        _set_view(opt, swarm, view(6))
        assert _batch(opt, model) and opt.epoch == 6


def test_a_round_without_a_group_leaves_the_peer_to_update_alone_and_carry_on():
    swarm, model, reference = MemorySwarm(), _model(), _model()
    with _optimizer(model, swarm) as opt:
        _set_view(opt, swarm, view(0, 90))
        assert _batch(opt, model, samples=10, seed=1)
        assert swarm.rounds == [(0, 10.0)] and opt.rounds == {"ok": 0, "no_group": 1}
        assert opt.epoch == 1 and opt.history[0]["samples"] == 10 and opt.history[0]["others"] == 90
        _set_view(opt, swarm, view(1, 0))
        assert not _batch(opt, model)
    _backward(reference, 1)
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for got, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, expected)


def test_the_round_of_a_group_formed_ahead_is_finished_rather_than_caught_up():
    swarm, model = MemorySwarm(), _model()
    swarm.matchmaking_seconds, swarm.prepare_ahead = 1e9, True
    other = [torch.zeros_like(p) for p in model.parameters()]
    swarm.peers = Peers({0: [(other, 30)]})
    with _optimizer(model, swarm) as opt:
        assert not _batch(opt, model) and not _batch(opt, model)  # a throughput: an estimated end
        _set_view(opt, swarm, view(0, 30))
        assert swarm.prepared.wait(5)
        _set_view(opt, swarm, view(1))  # the swarm ended epoch 0 a moment before this peer noticed
        assert opt.watch.prepared_epoch == 0  # set on the loop before the refresh above ran there
        assert _batch(opt, model)
        assert swarm.rounds == [(0, 30.0)] and swarm.loads == 1  # the round, and no state loaded
        assert opt.epoch == 1 and opt.rounds == {"ok": 1, "no_group": 0}


def test_delayed_updates_are_applied_one_epoch_stale():
    swarm, model = MemorySwarm(), _model()
    with _optimizer(model, swarm, delay_updates=True) as opt:
        before = [p.detach().clone() for p in model.parameters()]
        assert _batch(opt, model, samples=TARGET)
        assert opt.epoch == 1 and _same(model, before), "the update landed before its round ended"
    assert not _same(model, before)  # close() applies it

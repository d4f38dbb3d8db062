"""State rounds overlapped with training (`delay_state_averaging`, optim/state_rounds.py): the delta
rule against plain torch, the optimizer against an in-memory swarm whose state round the test
holds, the combinations refused, and two trainer processes whose state round hangs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import threading
from collections.abc import Sequence

import pytest
import torch

from apiary.averaging.averager import STATE_ROUNDS
from apiary.optim import Optimizer, check_mode
from apiary.optim.rules import GradientAveraging, RoundGroup
from apiary.optim.state import run_state
from apiary.optim.state_rounds import StateRounds
from service_processes import APIARY
from test_optim_epochs import TARGET, MemorySwarm, view
from trainer_processes import TrainerSwarm


def _model(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def _backward(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    model.zero_grad()
    ((model(torch.randn(4, 3, generator=generator)) - 1) ** 2).mean().backward()


def _adam(params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.05)


def _state(rule: GradientAveraging) -> list[torch.Tensor]:
    return [t.detach().clone() for t in run_state(rule, 0)[1]]


class Held:
    """`Rounds` whose rounds end when the test averages them with another peer's tensors (`finish`);
    gradient rounds find no group at once unless `hold_gradients`."""

    def __init__(self, hold_gradients: bool = False) -> None:
        self.hold_gradients = hold_gradients
        self.started: list[tuple[list[torch.Tensor], float, int, concurrent.futures.Future]] = []

    def start(self, tensors: list[torch.Tensor], weight: float, round_index: int) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.started.append((tensors, weight, round_index, future))
        if round_index < STATE_ROUNDS and not self.hold_gradients:
            future.set_result(None)
        return future

    def finish(self, index: int, others: Sequence[torch.Tensor] | None) -> None:
        """Round `index` meets a peer of equal weight holding `others` (None: it finds no group)."""
        tensors, _, _, future = self.started[index]
        if others is not None:
            for tensor, other in zip(tensors, others):
                tensor.copy_((tensor + other) / 2)
        future.set_result(RoundGroup(2, ("a", "b")) if others is not None else None)

    def result(self, future: concurrent.futures.Future, what: str) -> RoundGroup | None:
        return future.result(5)


def _epoch(rule: GradientAveraging, model: torch.nn.Module, rounds: Held, epoch: int, seed: int) -> None:
    """One batch, the epoch's end, and its gradient round meets nobody."""
    _backward(model, seed)
    rule.on_batch(4)
    rule.finish_epoch(epoch, 4)
    if rule.delay_updates:
        rounds.finish(len(rounds.started) - 1, None)
        rule.poll()


@pytest.mark.parametrize("delay_updates", [False, True])
def test_a_delayed_state_round_lands_as_the_mean_plus_the_progress_made_meanwhile(delay_updates):
    model, rounds = _model(), Held(hold_gradients=delay_updates)
    rule = GradientAveraging(list(model.parameters()), _adam(list(model.parameters())), None, rounds,
                             delay_updates=delay_updates)
    state = StateRounds(rule, rounds, delayed=True)
    _epoch(rule, model, rounds, 0, seed=1)  # Adam's moments exist from here on
    state.due(1)
    assert [index for _, _, index, _ in rounds.started][-1] == STATE_ROUNDS + 1
    snapshot = _state(rule)
    others = [t * 0.5 + 0.25 for t in snapshot]  # another peer's parameters and moments
    _epoch(rule, model, rounds, 1, seed=2)  # training goes on while the state round runs
    state.poll()
    progressed = _state(rule)
    assert not any(torch.equal(a, b) for a, b in zip(progressed[:2], snapshot[:2])), "no progress meanwhile"
    rounds.finish(1, others)
    state.poll()
    for got, before, mine, other in zip(_state(rule), snapshot, progressed, others):
        torch.testing.assert_close(got, (before + other) / 2 + (mine - before))
    assert not state.pending


def _state_due_as_epoch_one_ends() -> tuple[Held, GradientAveraging, StateRounds]:
    """Delayed updates: epoch 1's gradient round runs (held) as a state round falls due."""
    model, rounds = _model(), Held(hold_gradients=True)
    rule = GradientAveraging(list(model.parameters()), _adam(list(model.parameters())), None, rounds,
                             delay_updates=True)
    state = StateRounds(rule, rounds, delayed=True)
    _epoch(rule, model, rounds, 0, seed=1)
    _backward(model, 2)
    rule.on_batch(4)
    rule.finish_epoch(1, 4)  # the gradient round of epoch 1 runs
    state.due(2)
    return rounds, rule, state


def test_with_delayed_updates_the_state_round_waits_for_the_epochs_update_to_land():
    rounds, rule, state = _state_due_as_epoch_one_ends()
    assert len(rounds.started) == 2, "the state round started before the epoch's update landed"
    rounds.finish(1, None)
    rule.poll()  # the update lands: the state averaged includes it
    landed = _state(rule)
    state.poll()
    assert rounds.started[2][2] == STATE_ROUNDS + 2
    assert all(torch.equal(a, b) for a, b in zip(rounds.started[2][0], landed))


def test_a_due_state_round_starts_before_the_next_epochs_gradient_round():
    rounds, rule, state = _state_due_as_epoch_one_ends()
    rounds.finish(1, None)  # the round ended, but no batch polled it before the epoch's end
    state.settle()
    rule.finish_epoch(2, 4)
    assert [index for _, _, index, _ in rounds.started] == [0, 1, STATE_ROUNDS + 2, 2]


class HeldSwarm(MemorySwarm):
    """A swarm of two peers whose state rounds end when the test releases them."""

    def __init__(self) -> None:
        super().__init__()
        self.view = view(0, 0.0, peers=2)
        self.release = threading.Event()
        self.other_state: list[torch.Tensor] = []

    async def average(self, tensors: Sequence[torch.Tensor], weight: float, round_index: int) -> int | None:
        self.rounds.append((round_index, weight))
        if round_index < STATE_ROUNDS:
            return None  # gradient rounds find no group: each peer steps alone
        await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 10)
        for tensor, other in zip(tensors, self.other_state):
            tensor.copy_((tensor + other) / 2)
        return 2


def test_the_optimizer_trains_on_while_its_state_round_runs_and_keeps_that_progress():
    swarm, model = HeldSwarm(), _model()
    opt = Optimizer("overlapped", model.parameters(), _adam, target_batch_size=TARGET, swarm=swarm,
                    average_state_every=2, delay_state_averaging=True)
    with opt:
        opt.refresh()
        for seed in (1, 2):
            _backward(model, seed)
            assert opt.step(TARGET)  # at the end of epoch 1: its update, then the state round of epoch 2 starts
        snapshot = [t.detach().clone() for t in opt.state()[1]]
        swarm.other_state = [t * 0.5 for t in snapshot]
        _backward(model, 3)
        assert opt.step(TARGET) and opt.epoch == 3  # epoch 2 ended while the state round was held
        assert [index for index, _ in swarm.rounds] == [0, 1, STATE_ROUNDS + 2, 2]
        progressed = [t.detach().clone() for t in opt.state()[1]]
        assert not torch.equal(progressed[0], snapshot[0])
        swarm.release.set()
        opt.state_rounds.flush()
        for got, before, mine, other in zip(opt.state()[1], snapshot, progressed, swarm.other_state):
            torch.testing.assert_close(got, (before + other) / 2 + (mine - before))


def test_a_peer_that_takes_a_whole_state_forgets_its_running_state_round():
    swarm, model = HeldSwarm(), _model()
    with Optimizer("forgotten", model.parameters(), _adam, target_batch_size=TARGET, swarm=swarm,
                   average_state_every=1, delay_state_averaging=True) as opt:
        opt.refresh()
        _backward(model, 1)
        assert opt.step(TARGET)
        assert opt.state_rounds.pending
        metadata, tensors = opt.state()
        given = [t.detach() + 1.0 for t in tensors]
        opt.load_state(metadata, given)
        assert not opt.state_rounds.pending
        swarm.release.set()
    assert all(torch.equal(a, b) for a, b in zip(opt.state()[1], given))


@pytest.mark.parametrize("options, message", [
    ({"mode": "local"}, "delay_state_averaging applies to mode='gradients' or 'powersgd' only"),
    ({"mode": "diloco"}, "delay_state_averaging applies to mode='gradients' or 'powersgd' only"),
    ({"auxiliary": True}, "auxiliary peers: they hold no state"),
    ({"average_state_every": 0}, "average_state_every is 0"),
])
def test_combinations_without_state_rounds_to_overlap_are_refused(options, message):
    mode = options.pop("mode", "gradients")
    with pytest.raises(ValueError, match=message):
        check_mode(mode, delay_state_averaging=True, **options)
    check_mode("powersgd", delay_state_averaging=True, average_state_every=3)
    check_mode("gradients", delay_state_averaging=True, delay_updates=True, offload_optimizer=True)


def test_the_trainer_refuses_a_combination_with_one_line():
    result = subprocess.run([*APIARY, "trainer", "--run-id", "bad", "--mode", "diloco"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "APIARY_DELAY_STATE_AVERAGING": "1"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apiary: error:") and "delay_state_averaging" in lines[0], lines


HANG = 10.0  # seconds each peer's averager holds the state round of epoch 2, its group formed


@pytest.mark.timeout(240)
def test_two_peers_train_through_a_hanging_state_round_and_end_with_the_same_parameters(tmp_path):
    epochs = 6
    common = ["--target-batch-size", "32", "--max-epochs", str(epochs), "--average-state-every", "2",
              "--delay-state-averaging", "--min-peers", "2"]
    hang = {"APIARY_FAULTS": f"averager.round={STATE_ROUNDS + 2}:hang:{HANG:g}"}
    with TrainerSwarm(tmp_path, "overlapped", common) as swarm:
        swarm.start(seed=0, env=hang)
        swarm.start(seed=1, env=hang)
        summaries = swarm.finish()
        parameters = [swarm.parameters(index) for index in summaries]
    for summary in summaries.values():
        assert summary["epoch_end"] >= epochs - 1, summary
        ended = {entry["epoch"]: entry for entry in summary["history"]}
        # the state round of epoch 2 started as epoch 1 ended and hung: epoch 2's batches were trained
        # meanwhile, and only epoch 2's gradient round (after the state round in the averager) waited
        assert ended[2]["time"] - ended[1]["time"] < HANG / 2, summary["history"]
        assert ended[2]["round_seconds"] > HANG / 2, summary["history"]
        assert summary["rounds"]["ok"] >= epochs + 1, summary["rounds"]  # the gradient rounds and a state round
    for mine, theirs in zip(*parameters):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)

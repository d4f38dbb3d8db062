"""PowerSGD gradient averaging (optim/powersgd.py): two peers' rules against plain torch math,
error feedback, rank-r exactness, the bytes it saves, and training with real services."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import subprocess
import threading
import time
from collections.abc import Sequence

import pytest
import torch

from apiary.optim import Optimizer, SwarmProgress, check_mode
from apiary.optim.powersgd import Q_ROUNDS, PowerSGD, compressible, round_values
from apiary.optim.rules import RoundGroup
from apiary.tasks.charlm import task as charlm
from service_processes import APIARY
from test_optim_epochs import MemorySwarm, Peers
from test_optim_training import FAST_ROUNDS
from trainer_processes import TrainerSwarm

ROWS, COLS, RANK = 12, 10, 2


GROUP = RoundGroup(2, ("peer-a", "peer-b"))


class Pair:
    """`Rounds` of a group of two (`GROUP`): the rules of `peers` peers, run in threads, and a round
    ends when all started it (samples-weighted mean, in place). `moved` rounds meet another peer
    instead (its tensors: the caller's times 3), `twinned` rounds another peer with the caller's very
    tensors (nothing but the member list tells that group from `GROUP`); `missing` rounds find no group."""

    def __init__(self, peers: int = 2, moved: Sequence[int] = (), missing: Sequence[int] = (),
                 twinned: Sequence[int] = ()):
        self.peers, self.moved, self.missing, self.twinned = peers, set(moved), set(missing), set(twinned)
        self.waiting: dict[int, list[tuple[list[torch.Tensor], float, concurrent.futures.Future]]] = {}
        self.rounds: list[tuple[int, list[torch.Size]]] = []
        self.lock = threading.Lock()

    def start(self, tensors: list[torch.Tensor], weight: float, round_index: int) -> concurrent.futures.Future:
        future: concurrent.futures.Future[int | None] = concurrent.futures.Future()
        with self.lock:
            self.rounds.append((round_index, [t.shape for t in tensors]))
            if round_index in self.missing:
                future.set_result(None)
                return future
            if round_index in self.moved or round_index in self.twinned:
                factor = 3 if round_index in self.moved else 1
                for t in tensors:
                    t.copy_((t * weight + factor * t * weight) / (2 * weight))
                future.set_result(RoundGroup(2, ("peer-a", "peer-c")))
                return future
            waiting = self.waiting.setdefault(round_index, [])
            waiting.append((tensors, weight, future))
            if len(waiting) == self.peers:
                total = sum(w for _, w, _ in waiting)
                means = [sum(ts[i] * w for ts, w, _ in waiting) / total for i in range(len(tensors))]
                for ts, _, f in waiting:
                    for t, mean in zip(ts, means):
                        t.copy_(mean)
                    f.set_result(GROUP)
        return future

    def result(self, future: concurrent.futures.Future, what: str) -> RoundGroup | None:
        return future.result(10)


class Net(torch.nn.Module):
    """A matrix PowerSGD compresses (12 x 10 at rank 2), and a bias it sends whole."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(ROWS, COLS))
        self.bias = torch.nn.Parameter(torch.zeros(ROWS))


def _rule(rounds: Pair, lr: float = 1.0) -> tuple[Net, PowerSGD]:
    net = Net()
    params = list(net.parameters())
    return net, PowerSGD(params, torch.optim.SGD(params, lr=lr), None, rounds, rank=RANK, min_size=0, seed=7)


def _epoch(pairs: Sequence[tuple[Net, PowerSGD]], grads: Sequence[tuple[torch.Tensor, torch.Tensor]],
           samples: Sequence[int], epoch: int) -> None:
    """Each peer takes its (weight, bias) gradient as one batch of its samples; the epochs end together."""
    def finish(index: int) -> None:
        net, rule = pairs[index]
        net.weight.grad, net.bias.grad = (g.clone() for g in grads[index])
        rule.on_batch(samples[index])
        rule.finish_epoch(epoch, samples[index])

    with concurrent.futures.ThreadPoolExecutor(len(pairs)) as pool:
        for done in [pool.submit(finish, i) for i in range(len(pairs))]:
            done.result(10)


def _gradients(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(ROWS, COLS, generator=generator), torch.randn(ROWS, generator=generator)


def test_two_peers_apply_the_power_iteration_of_their_weighted_mean_gradient():
    rounds = Pair()
    peers = [_rule(rounds), _rule(rounds)]
    grads, samples = [_gradients(1), _gradients(2)], [30, 10]
    _epoch(peers, grads, samples, epoch=0)

    # plain torch: P = M_i Q averaged, orthonormalized; Q = M_i^T P averaged; update P Q^T
    q0 = torch.randn(COLS, RANK, generator=torch.Generator().manual_seed(7 * 1_000_003))
    mean = (grads[0][0] * 30 + grads[1][0] * 10) / 40
    p = torch.linalg.qr(mean @ q0).Q
    q = mean.T @ p
    update = p @ q.T
    bias = (grads[0][1] * 30 + grads[1][1] * 10) / 40
    for (net, rule), (m, _) in zip(peers, grads):
        torch.testing.assert_close(net.weight.detach(), -update)  # SGD at lr 1 from zeros
        torch.testing.assert_close(net.bias.detach(), -bias)
        torch.testing.assert_close(rule.residuals[0], m - update)
        torch.testing.assert_close(rule.qs[0], q)  # the next epoch's warm start
        assert rule.fallbacks == 0
    assert [(index, shapes) for index, shapes in rounds.rounds[::2]] == [
        (0, [torch.Size([ROWS, RANK]), torch.Size([ROWS])]),  # round one: P and the bias
        (Q_ROUNDS, [torch.Size([COLS, RANK])]),  # round two: Q
    ]


def test_error_feedback_sends_later_what_an_epoch_did_not():
    rounds = Pair()
    peers = [_rule(rounds), _rule(rounds)]
    grads = [_gradients(1), _gradients(2)]
    sent = torch.zeros(ROWS, COLS)
    for epoch in range(3):
        before = peers[0][0].weight.detach().clone()
        _epoch(peers, grads, [10, 10], epoch)
        step = before - peers[0][0].weight.detach()
        sent += step
        mean_residual = (peers[0][1].residuals[0] + peers[1][1].residuals[0]) / 2
        # what the swarm applied plus what it still owes is exactly the gradients it was given (without
        # the residuals fed back, the owed part of each epoch would be lost instead)
        mean = (grads[0][0] + grads[1][0]) / 2
        torch.testing.assert_close(sent + mean_residual, mean * (epoch + 1), rtol=1e-4, atol=1e-4)
        assert torch.linalg.matrix_rank(step) <= RANK
        assert mean_residual.abs().max() > 0.1  # a rank-2 step cannot carry it all: the rest is owed


def test_a_rank_r_mean_gradient_is_sent_exactly():
    rounds = Pair()
    peers = [_rule(rounds), _rule(rounds)]
    generator = torch.Generator().manual_seed(3)
    columns = torch.randn(ROWS, RANK, generator=generator)  # both peers' gradients in one rank-2 span
    grads = [(columns @ torch.randn(RANK, COLS, generator=generator), torch.zeros(ROWS)) for _ in range(2)]
    _epoch(peers, grads, [10, 30], epoch=0)
    mean = (grads[0][0] * 10 + grads[1][0] * 30) / 40
    for net, _ in peers:
        torch.testing.assert_close(net.weight.detach(), -mean, rtol=1e-5, atol=1e-5)
    weighted = (peers[0][1].residuals[0] * 10 + peers[1][1].residuals[0] * 30) / 40
    assert weighted.abs().max() < 1e-5


@pytest.mark.parametrize("moved, twinned, missing, why", [
    ((Q_ROUNDS,), (), (), "is not its P round's"),
    ((), (Q_ROUNDS,), (), "is not its P round's"),  # same size, same values: only the members differ
    ((), (), (Q_ROUNDS,), "Q round found no group"),
    ((), (), (0,), "P round found no group"),
])
def test_a_peer_whose_rounds_fail_or_change_group_steps_on_its_own_gradient(moved, twinned, missing, why, caplog):
    rounds = Pair(peers=1, moved=moved, missing=missing, twinned=twinned)
    net, rule = _rule(rounds)
    rule.residuals[0] += 1.0  # owed from earlier epochs
    grad = _gradients(1)
    with caplog.at_level(logging.INFO, logger="apiary.optim.powersgd"):
        _epoch([(net, rule)], [grad], [10], epoch=0)
    torch.testing.assert_close(net.weight.detach(), -(grad[0] + 1.0))  # its own, what it owed included
    assert not rule.residuals[0].any() and rule.fallbacks == 1
    assert any(why in r.getMessage() and "own gradient" in r.getMessage() for r in caplog.records), caplog.text


def test_small_and_one_dimensional_tensors_travel_whole():
    assert compressible(torch.Size([256, 64]), 4, 4096)
    assert not compressible(torch.Size([256]), 4, 0)  # 1-D
    assert not compressible(torch.Size([32, 32]), 4, 4096)  # under the minimum size
    assert not compressible(torch.Size([8, 8]), 4, 0)  # rank 4 factors are as large as the matrix
    assert compressible(torch.Size([8, 4, 4]), 2, 0)  # viewed as 8 x 16


def test_rank_4_sends_over_10x_fewer_bytes_than_float32_on_the_charlm_model():
    shapes = [p.shape for p in charlm().model.parameters()]
    full = sum(s.numel() for s in shapes)
    first, second = round_values(shapes, rank=4, min_size=4096)
    assert full / (first + second) >= 10, (full, first, second)
    first, second = round_values(shapes, rank=32, min_size=4096)
    assert full / (first + second) < 10  # a higher rank sends more


def test_the_mode_takes_no_options_of_plain_gradient_averaging():
    check_mode("powersgd")
    for options, name in (({"delay_updates": True}, "delay_updates"), ({"auxiliary": True}, "auxiliary"),
                          ({"reuse_grad_buffers": True}, "reuse_grad_buffers")):
        with pytest.raises(ValueError, match=name):
            check_mode("powersgd", **options)
    with pytest.raises(ValueError, match="powersgd_rank"):
        _rule_with(rank=0)


def _rule_with(**options: int) -> PowerSGD:
    net = Net()
    return PowerSGD(list(net.parameters()), torch.optim.SGD(net.parameters(), lr=1.0), None, Pair(), **options)



class RecordingSwarm(MemorySwarm):
    """Remembers the shapes it was asked to form groups ahead for and registered."""

    def __init__(self) -> None:
        super().__init__()
        self.schemas: list[list[torch.Size]] = []

    async def register(self, tensors: Sequence[torch.Tensor]) -> None:
        self.schemas.append([t.shape for t in tensors])

    async def prepare(self, tensors: Sequence[torch.Tensor], round_index: int) -> bool:
        self.schemas.append([t.shape for t in tensors])
        return await super().prepare(tensors, round_index)


def test_the_optimizer_in_powersgd_mode_runs_both_rounds_and_forms_groups_ahead_for_the_first():
    swarm, net = RecordingSwarm(), Net()
    swarm.matchmaking_seconds, swarm.prepare_ahead = 1e9, True
    first_round = [torch.zeros(ROWS, RANK), torch.zeros(ROWS)]
    swarm.peers = Peers({0: [(first_round, 30)]})  # round one meets a peer; round two finds no group
    opt = Optimizer("memory", net.parameters(), lambda p: torch.optim.SGD(p, lr=1.0), target_batch_size=100,
                    swarm=swarm, average_state_every=0, mode="powersgd", powersgd_rank=RANK, powersgd_min_size=0)
    with opt:
        assert swarm.schemas == [[torch.Size([ROWS, RANK]), torch.Size([ROWS])]]
        grad = _gradients(1)
        net.weight.grad, net.bias.grad = (g.clone() for g in grad)
        assert not opt.step(10)
        swarm.view = SwarmProgress(0, 30.0, 30.0, 10.0, 2, time.monotonic())
        assert opt.refresh() is swarm.view and swarm.prepared.wait(5)
        assert swarm.schemas[-1] == swarm.schemas[0]
        net.weight.grad, net.bias.grad = (g.clone() for g in grad)
        assert opt.step(60)
    assert swarm.rounds == [(0, 70.0), (Q_ROUNDS, 70.0)]
    assert opt.rule.fallbacks == 1  # round two found no group: its own weight gradient, the bias averaged
    torch.testing.assert_close(net.weight.detach(), -grad[0])
    torch.testing.assert_close(net.bias.detach(), -grad[1] * 70 / 100)


@pytest.mark.timeout(360)  # four trainer processes, two at a time, on 2 cores
def test_two_peers_train_as_well_as_with_uncompressed_gradients_on_over_10x_fewer_bytes(tmp_path):
    """The charlm task's own model (its default size: the one the 10x is claimed for), 2 peers."""
    epochs = 12
    common = ["--target-batch-size", "32", "--max-epochs", str(epochs), "--average-state-every", "0",
              "--averaging", FAST_ROUNDS, "--min-peers", "2", "--task-options", '{"eval_batches": 2}']
    swarms = {mode: TrainerSwarm(tmp_path / mode, mode, [*common, "--mode", mode, "--powersgd-rank", "4"])
              for mode in ("gradients", "powersgd")}
    with swarms["gradients"], swarms["powersgd"]:  # both runs at once: their rounds wait on the network, not CPU
        for swarm in swarms.values():
            swarm.start(seed=0)
            swarm.start(seed=1)
        runs = {mode: swarm.finish() for mode, swarm in swarms.items()}
    for summaries in runs.values():
        assert all(s["epoch_end"] >= epochs - 1 for s in summaries.values()), summaries  # one may stop a step early
    plain, powersgd = (max(summaries.values(), key=lambda s: s["rounds"]["ok"]) for summaries in runs.values())
    assert plain["rounds"]["ok"] >= 0.8 * epochs and powersgd["rounds"]["ok"] >= 0.8 * 2 * epochs, (plain, powersgd)
    # the same samples: the loss after them within 5% of uncompressed averaging's
    plain_loss, powersgd_loss = (min(s["loss_end"] for s in summaries.values()) for summaries in runs.values())
    assert powersgd_loss <= 1.05 * plain_loss, (plain_loss, powersgd_loss)
    assert powersgd_loss < powersgd["loss_start"] - 1.0
    # bytes per epoch as the averager reported them: one float32 round against a P and a Q round
    per_epoch_plain = plain["averaged_bytes"] / plain["rounds"]["ok"]
    per_epoch_powersgd = powersgd["averaged_bytes"] / (powersgd["rounds"]["ok"] / 2)
    assert per_epoch_plain >= 10 * per_epoch_powersgd, (per_epoch_plain, per_epoch_powersgd)


@pytest.mark.parametrize("args, env, expected", [
    (["--mode", "powersgd", "--powersgd-rank", "0"], {}, "--powersgd-rank"),
    (["--mode", "powersgd"], {"APIARY_POWERSGD_MIN_SIZE": "-1"}, "--powersgd-min-size"),
    (["--mode", "powersgd", "--delay-updates"], {}, "delay_updates"),
])
def test_bad_powersgd_settings_stop_the_trainer_with_one_line(args, env, expected):
    result = subprocess.run([*APIARY, "trainer", "--run-id", "bad", *args], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **env})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apiary: error:") and expected in lines[0], result.stderr

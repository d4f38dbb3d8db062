"""Failure injection points (`apiary.faults`): the plan's syntax, each action, the `apiary`
command's `--faults` / APIARY_FAULTS, and an averager process that crashes at a chosen round."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
import torch
from averaging_harness import AveragingSwarm, make_tensors
from service_processes import APIARY

from apiary import faults
from apiary.faults import CRASH_EXIT_CODE, Fault, FaultPlan, FaultSpecError, InjectedFault


@pytest.fixture
def plan():
    """Installs the plan of a spec for the test (and returns it); none afterwards."""

    def install(spec: str) -> FaultPlan:
        installed = FaultPlan.parse(spec)
        faults.install(installed)
        return installed

    yield install
    faults.install(None)


def test_a_plan_lists_its_faults_by_point_and_round():
    parsed = FaultPlan.parse(" averager.round=3:crash , trainer.epoch=0:hang:2.5,trainer.epoch=7:raise ")
    assert sorted(parsed.faults, key=lambda f: (f.point, f.at)) == [
        Fault("averager.round", 3, "crash"), Fault("trainer.epoch", 0, "hang", 2.5), Fault("trainer.epoch", 7, "raise")]
    assert FaultPlan.parse("").faults == [] and FaultPlan.parse(" , ").faults == []


@pytest.mark.parametrize("spec, named", [
    ("averager.round:crash", "no '='"),
    ("averager.rond=3:crash", "unknown point 'averager.rond'; the points are averager.round, trainer.epoch"),
    ("trainer.epoch=-1:crash", "the round or epoch must be a whole number >= 0, got '-1'"),
    ("trainer.epoch=two:crash", "the round or epoch must be a whole number >= 0, got 'two'"),
    ("trainer.epoch=2:explode", "unknown action 'explode'; the actions are crash, hang, raise"),
    ("trainer.epoch=2", "unknown action ''"),
    ("trainer.epoch=2:crash:5", "crash takes no argument, got '5'"),
    ("trainer.epoch=2:hang", "hang needs its seconds, got ''"),
    ("trainer.epoch=2:hang:-1", "hang needs seconds >= 0, got '-1'"),
    ("trainer.epoch=2:hang:inf", "hang needs seconds >= 0, got 'inf'"),
])
def test_a_bad_plan_is_refused_naming_the_entry_and_what_is_wrong(spec, named):
    with pytest.raises(FaultSpecError) as info:
        FaultPlan.parse(f"trainer.epoch=1:raise,{spec}")
    assert f"fault {spec!r}: {named}" in str(info.value), str(info.value)


def test_raise_fires_once_at_the_first_round_at_or_past_its_own(plan):
    installed = plan("averager.round=3:raise")
    faults.reached("averager.round", 2)
    faults.reached("trainer.epoch", 9)  # another point
    with pytest.raises(InjectedFault, match="raise at averager.round 3"):
        faults.reached("averager.round", 5)  # rounds 3 and 4 were skipped
    faults.reached("averager.round", 6)
    assert installed.faults == []


def test_hang_holds_the_thread_once(plan):
    plan("trainer.epoch=1:hang:0.3")
    started = time.monotonic()
    faults.reached("trainer.epoch", 1)
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    faults.reached("trainer.epoch", 2)
    assert time.monotonic() - started < 0.1


async def test_an_async_hang_holds_its_task_while_the_event_loop_runs_on(plan):
    plan("averager.round=0:hang:0.4")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    ticker = asyncio.ensure_future(tick())
    started = time.monotonic()
    await faults.reached_async("averager.round", 0)
    ticker.cancel()
    assert time.monotonic() - started >= 0.4
    assert ticks >= 5


def test_crash_ends_the_process_at_its_epoch_saying_so():
    code = ("from apiary import faults\n"
            "faults.install(faults.FaultPlan.parse('trainer.epoch=2:crash'))\n"
            "for epoch in range(5):\n"
            "    faults.reached('trainer.epoch', epoch)\n"
            "    print(epoch, flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == CRASH_EXIT_CODE, done.stderr
    assert done.stdout.split() == ["0", "1"]
    assert "apiary: fault injection: crash at trainer.epoch 2 (reached at 2)" in done.stderr


def test_without_a_plan_a_point_costs_next_to_nothing(plan):
    plan("")
    started = time.perf_counter()
    for epoch in range(100_000):
        faults.reached("trainer.epoch", epoch)
    assert time.perf_counter() - started < 0.5  # about 0.01 s


@pytest.mark.parametrize("args, env", [(["--faults", "trainer.epoch=1:boom"], {}),
                                       ([], {"APIARY_FAULTS": "trainer.epoch=1:boom"})])
def test_the_command_refuses_a_bad_plan_in_one_line(args, env):
    done = subprocess.run([*APIARY, *args, "version"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apiary: error: Invalid value for '--faults' / APIARY_FAULTS"), lines
    assert "unknown action 'boom'" in lines[0]


# ---------------------------------------------------------------- an averager process that crashes in round 2

ROUNDS = {"target_group_size": 4, "min_group_size": 2, "expected_peers": 4, "shapes": [[48], [9]],
          "gather_seconds": 0.6, "join_seconds": 0.6, "sender_timeout": 1.0, "round_timeout": 6.0,
          "rounds": 4, "period": 3.0, "fresh_each_round": True}
DOOMED = 2


def test_an_averager_crashing_at_round_two_averaged_round_one_and_the_others_carry_on_without_it():
    configs = [{**ROUNDS, "seed": 40 + i, "identity_seed": 40 + i} for i in range(4)]
    configs[DOOMED]["fault_plan"] = "averager.round=2:crash"
    with AveragingSwarm(configs) as swarm:
        results = swarm.results(4 * ROUNDS["period"] + 30.0)
        assert swarm.workers[DOOMED].process.wait(10) == CRASH_EXIT_CODE, swarm.stderr(DOOMED)
        assert "crash at averager.round 2" in swarm.stderr(DOOMED)
        doomed = swarm.peer_ids[DOOMED]
    survivors = [i for i in range(4) if i != DOOMED]
    assert [r.index for r in results] == survivors

    def mean(round_index: int, peers: list[int]) -> torch.Tensor:
        flat = [torch.cat([t.flatten() for t in make_tensors(40 + i, ROUNDS["shapes"], round_index)]) for i in peers]
        return torch.stack(flat).mean(0)

    for result in results:
        by_round = {record.round: record for record in result.rounds}
        assert sorted(by_round) == [0, 1, 2, 3] and all(r.error is None for r in result.rounds), result.rounds
        # round 1: the doomed peer averaged with its group
        assert by_round[1].size == 4 and doomed in by_round[1].members
        torch.testing.assert_close(result.history[1], mean(1, list(range(4))), rtol=0, atol=1e-5)
        # round 2: it died once the group had formed; the round still completed
        assert doomed in by_round[2].members
        # round 3: the others averaged without it
        assert by_round[3].members == sorted(swarm.peer_ids[i] for i in survivors)
        torch.testing.assert_close(result.history[3], mean(3, survivors), rtol=0, atol=1e-5)

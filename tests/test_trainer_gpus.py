"""Several GPUs per participant (`apiary trainer --gpus G`), with CPU ranks: the local ranks
reduce together, the swarm sees one peer whose rounds cost what a one-rank peer's cost."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from service_processes import APIARY
from trainer_processes import TrainerSwarm

pytestmark = pytest.mark.timeout(240)  # three training processes on 2 cores

BATCH = 8  # trainer_processes.SMALL_LM's batch size


def _rank_pids(output: str) -> dict[int, int]:
    """The local ranks' process ids, from the trainer's `local ranks: 0 (pid P, cpu), ...` line."""
    line = re.search(r"local ranks: (.*)", output)
    assert line, output
    return {int(rank): int(pid) for rank, pid in re.findall(r"(\d+) \(pid (\d+)", line.group(1))}


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def test_a_two_rank_participant_trains_with_a_one_rank_peer_as_one_peer(tmp_path):
    epochs = 4
    common = ["--target-batch-size", "64", "--max-epochs", str(epochs), "--average-state-every", "0",
              "--min-peers", "2", "--device", "cpu"]
    with TrainerSwarm(tmp_path, "gpus", common) as swarm:
        pair = swarm.start(seed=0, extra=["--gpus", "2"])
        swarm.start(seed=1)
        summaries = swarm.finish()
        numel = sum(t.numel() for t in swarm.parameters(0))
    two, one = summaries[0], summaries[1]
    assert [r["rank"] for r in two["local_ranks"]] == [0, 1] and _rank_pids(pair.output)[1] != pair.pid
    assert two["epoch_end"] >= epochs and one["epoch_end"] >= epochs, (two, one)
    # after every epoch the two ranks hold the same parameters (digests each rank computed)
    digests = two["rank_digests"]
    assert len(digests) >= epochs and all(d[0] == d[1] for d in digests.values()), digests
    # the participant's progress counts both ranks' batches: two per step
    assert all(h["samples"] % (2 * BATCH) == 0 and h["samples"] > 0 for h in two["history"]), two["history"]
    assert two["samples"] % (2 * BATCH) == 0
    # one contribution per round: the 2-rank participant sends and receives what the 1-rank peer
    # does, a group of two exchanging halves (2 x numel float32 values per round)
    assert two["rounds"]["ok"] >= epochs - 1 and one["rounds"]["ok"] >= epochs - 1, (two["rounds"], one["rounds"])
    per_round = {name: s["averaged_bytes"] / s["rounds"]["ok"] for name, s in (("two", two), ("one", one))}
    assert abs(per_round["two"] - per_round["one"]) <= 0.02 * per_round["one"], per_round
    assert 0.95 * 8 * numel <= per_round["two"] <= 1.05 * 8 * numel, (per_round, numel)
    assert two["loss_end"] < two["loss_start"], two


def test_a_killed_rank_stops_the_trainer_with_one_error_and_no_process_left(tmp_path):
    common = ["--target-batch-size", "64", "--average-state-every", "0", "--device", "cpu", "--gpus", "2"]
    with TrainerSwarm(tmp_path, "killed", common) as swarm:
        trainer = swarm.start(seed=0)
        ranks = _rank_pids(trainer.output)
        children = _children(trainer.pid)
        assert ranks[1] in children, (ranks, children)
        time.sleep(1.0)  # a few steps
        os.kill(ranks[1], signal.SIGKILL)
        code = trainer.process.wait(60)
        stderr = trainer.stderr()
        errors = [line for line in stderr.splitlines() if line.startswith("apiary: error:")]
        assert code == 1 and "Traceback" not in stderr, (code, stderr)
        assert errors == ["apiary: error: local rank 1 of 2 stopped (killed by SIGKILL)"], stderr
        assert _wait_gone(children, 10) == []
    with TrainerSwarm(tmp_path / "leader", "killed-leader", common) as swarm:
        # the other way round: the trainer (rank 0) killed, its rank follows it by itself
        leader = swarm.start(seed=1)
        rank = _rank_pids(leader.output)[1]
        os.kill(leader.pid, signal.SIGKILL)
        assert _wait_gone([rank], 15) == [], "rank 1 outlived its trainer"


@pytest.mark.parametrize("args, expected", [
    (["--gpus", "0"], "gpus must be a count of at least 1"),
    (["--gpus", "2", "--reuse-grad-buffers"], "reuse_grad_buffers cannot be combined with several gpus"),
    (["--gpus", "0,1", "--device", "cpu"], "names CUDA devices, but the device is cpu"),
])
def test_bad_gpu_settings_stop_the_trainer_with_one_line(args, expected):
    result = subprocess.run([*APIARY, "trainer", "--run-id", "bad", "--new-swarm", *args], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apiary: error:") and expected in lines[0], result.stderr

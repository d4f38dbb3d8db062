"""Six participants on 50 ms, 100 Mbit/s links train the language model together; two are
killed mid-run, the other four finish and their loss falls.

Every participant is one `apiary trainer` process (embedded dht and averager) in a network
namespace of its own, as on six machines: the first starts the run, the others join through
it, and all wait until the run has six peers. Two of them crash as they reach epoch 2 (the
fault `trainer.epoch=2:crash`: an exit with no goodbye); the survivors must still reach
`--max-epochs` and exit cleanly with a summary whose held-out loss fell.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from net.network import Link, Network, skip_reason
from net.trainers import read_summary, start_trainers
from trainer_processes import SMALL_LM

from apiary.faults import CRASH_EXIT_CODE

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

PEERS = 6
KILLED = (2, 5)  # one that joined early, the last to join
MAX_EPOCHS = 8
KILL_AT_EPOCH = 2
# a matchmaking round takes several round trips of 50 ms: a little more time than on loopback
WAN_ROUNDS = json.dumps({"gather_seconds": 1.0, "join_seconds": 2.0, "sender_timeout": 5.0})
OPTIONS = ["--task", "charlm", "--task-options", SMALL_LM, "--averaging", WAN_ROUNDS, "--threads", "1",
           "--target-batch-size", "192", "--average-state-every", "2", "--min-peers", str(PEERS),
           "--max-epochs", str(MAX_EPOCHS), "--evaluate-every", "600"]


@pytest.fixture
def network() -> Iterator[Network]:
    with Network([Link(rate_mbit=100, rtt_ms=50)] * PEERS) as net:
        yield net
    assert net.leftovers() == []


@pytest.mark.timeout(240)
def test_six_peers_train_on_shaped_links_and_four_finish_after_two_are_killed(network: Network, tmp_path: Path) -> None:
    started = time.monotonic()
    crash = {index: {"APIARY_FAULTS": f"trainer.epoch={KILL_AT_EPOCH}:crash"} for index in KILLED}
    trainers = start_trainers(network.hosts, "wan-lm", tmp_path, OPTIONS, env=crash)
    all_up = time.monotonic()
    for index in KILLED:
        try:
            code = trainers[index].wait(max(1.0, 120 - (time.monotonic() - all_up)))
        except subprocess.TimeoutExpired:
            pytest.fail(f"h{index} did not reach epoch {KILL_AT_EPOCH} within 120s\n{trainers[index].report()}")
        assert code == CRASH_EXIT_CODE, trainers[index].report()
    killed_at = time.monotonic()

    survivors = [index for index in range(PEERS) if index not in KILLED]
    for index in survivors:
        try:
            code = trainers[index].wait(max(1.0, 180 - (time.monotonic() - killed_at)))
        except subprocess.TimeoutExpired:
            pytest.fail(f"h{index} did not finish within 180s of the kills\n{trainers[index].report()}")
        assert code == 0, trainers[index].report()
    finished = time.monotonic()
    summaries = {index: read_summary(tmp_path, index) for index in survivors}
    for index, summary in summaries.items():
        assert summary["epoch_start"] == 0 and summary["epoch_end"] >= MAX_EPOCHS, (index, summary)
        assert summary["loss_end"] < summary["loss_start"], (index, summary)
        assert summary["rounds"]["ok"] >= MAX_EPOCHS // 2, (index, summary["rounds"])  # they trained together
    print(f"startup {all_up - started:.0f}s, killed at swarm epoch {KILL_AT_EPOCH} after {killed_at - all_up:.0f}s, "
          f"survivors done {finished - killed_at:.0f}s later; loss "
          + ", ".join(f"h{i} {s['loss_start']:.2f}->{s['loss_end']:.2f}" for i, s in summaries.items()))

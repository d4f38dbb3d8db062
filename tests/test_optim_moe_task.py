"""The mixture-of-experts task end to end: `apiary up` with expert servers and two trainers."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from service_processes import APIARY

pytestmark = pytest.mark.timeout(360)  # several trainer processes on 2 cores


def run_up(task: str, peers: int, duration: int, target_batch_size: int,
           timeout: float) -> tuple[re.Match[str], str]:
    """Runs `apiary up` on `task`; its summary line (loss start → end, samples/s, epochs) and stdout."""
    result = subprocess.run([*APIARY, "up", "--task", task, "--peers", str(peers), "--duration", str(duration),
                             "--target-batch-size", str(target_batch_size)],
                            capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = re.search(r"loss ([0-9.]+) → ([0-9.]+); swarm samples/s (\d+); epochs (\d+)", result.stdout)
    assert match, result.stdout[-3000:]
    return match, result.stdout


def test_up_trains_the_digits_moe_task_through_expert_servers() -> None:
    match, stdout = run_up("digits_moe", 2, 20, 128, timeout=240)
    start, end, epochs = float(match[1]), float(match[2]), int(match[4])
    assert end < 0.6 * start and epochs >= 2, stdout[-3000:]

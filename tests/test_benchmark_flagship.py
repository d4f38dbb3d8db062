"""benchmarks/flagship.py's and benchmarks/moe_layer.py's pure helpers: how the grid is shared
between expert servers, how the trainers' step logs are written and read, and the verdicts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import flagship  # noqa: E402
import moe_layer  # noqa: E402


def test_the_grid_rows_are_shared_without_gaps_or_overlaps() -> None:
    assert moe_layer.row_ranges(4, 3) == [(0, 1), (1, 3), (3, 4)]
    assert moe_layer.row_ranges(4, 1) == [(0, 4)]
    with pytest.raises(ValueError, match="5 servers cannot share 4 grid rows"):
        moe_layer.row_ranges(4, 5)


def test_a_grid_is_given_as_rows_x_columns() -> None:
    assert moe_layer.parse_grid("4x2") == (4, 2)
    with pytest.raises(Exception, match="ROWSxCOLUMNS"):
        moe_layer.parse_grid("4by2")


def test_every_expert_server_hosts_a_row_range_of_every_moe_layer() -> None:
    flags = flagship.server_flags("tiny", 3)
    assert [f[1] for f in flags] == ["lm1.[0:1].[0:4],lm3.[0:1].[0:4]", "lm1.[1:3].[0:4],lm3.[1:3].[0:4]",
                                     "lm1.[3:4].[0:4],lm3.[3:4].[0:4]"]
    assert all(f[f.index("--hidden-size") + 1] == "64" for f in flags)


def test_the_timed_task_logs_each_step_and_the_evaluations(tmp_path: Path) -> None:
    task = flagship.timed_task(str(tmp_path), eval_every=2, preset="tiny", experts="local", seed=3, eval_batches=1)
    for _ in range(3):
        task.loss(task.model, next(task.batches)).backward()
    records = flagship.read_logs(tmp_path)[0]
    steps = [r for r in records if "end" in r]
    assert len(steps) == 3 and all(r["end"] >= r["start"] and r["loss"] > 0 for r in steps)
    assert [r["step"] for r in flagship.evaluations(records)] == [2]  # evaluated before the third batch
    assert (tmp_path / "trainer-3.jsonl").exists()


def test_steps_are_selected_by_time_and_timed(tmp_path: Path) -> None:
    records = [{"start": 1.0, "end": 2.5, "loss": 5.0}, {"step": 1, "eval": 4.0, "time": 3.0},
               {"start": 3.0, "end": 3.5, "loss": 4.5}]
    (tmp_path / "trainer-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    logged = flagship.read_logs(tmp_path)[0]
    assert flagship.durations(flagship.steps_between(logged, 0, 3.0)) == [1.5]
    assert flagship.durations(flagship.steps_between(logged, 3.0, float("inf"))) == [0.5]


def test_the_summary_says_what_was_met_and_what_was_not() -> None:
    figures = {"timeout": 5.0, "local": {"loss": 3.0, "tokens_per_second": 1000.0},
               "dense": {"loss": 2.9, "tokens_per_second": 1200.0},
               "swarm": {"sequences_before_faults": 384, "loss_before_faults": 3.3, "tokens_per_second": 500.0,
                         "steps_after_faults": 20, "loss_end": 3.1, "step_seconds_max_after_faults": 12.0}}
    text = flagship.summary(figures)
    assert "= 1.100 (NOT within 5%)" in text
    assert "= 0.50" in text
    assert "(falls)" in text and "NOT met" in text and "MoE NOT lower" in text

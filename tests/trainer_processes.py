"""Trainer processes (`apiary trainer`) for the collaborative-training tests.

    with TrainerSwarm(tmp_path, run_id="r", common=["--target-batch-size", "256"]) as swarm:
        first = swarm.start(seed=0)                  # a new swarm, embedded dht and averager
        swarm.start(seed=1, extra=["--client-mode"])  # joins through the first
        summaries = swarm.finish()                   # waits for every trainer, reads its summary

Each trainer writes its summary (JSON) and final checkpoint (the optimizer's state) under
`tmp_path/<index>/`; `state(index)` loads the parameters of that checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from apiary.averaging.state import load_saved_state
from service_processes import ServiceProcess, ServiceProcesses

# A small model and quick rounds: 2 CPU cores run the whole swarm.
SMALL_LM = json.dumps({"width": 32, "layers": 1, "heads": 2, "context": 32, "batch_size": 8, "eval_batches": 2})
QUICK_ROUNDS = json.dumps({"gather_seconds": 0.5, "join_seconds": 1.5, "sender_timeout": 5.0})


class TrainerSwarm:
    def __init__(self, directory: Path, run_id: str, common: list[str]):
        self.directory = directory
        self.run_id = run_id
        self.common = common
        self.processes = ServiceProcesses()
        self.trainers: list[ServiceProcess] = []
        self.first_address = ""

    def start(self, seed: int, extra: list[str] = (), wait: bool = True,
              env: dict[str, str] | None = None) -> ServiceProcess:
        index = len(self.trainers)
        folder = self.directory / str(index)
        folder.mkdir(parents=True, exist_ok=True)
        trainer = self.processes.start(
            "trainer", "--run-id", self.run_id, "--seed", str(seed),
            *(["--initial-peers", self.first_address] if self.first_address else ["--new-swarm"]),
            "--task-options", SMALL_LM, "--averaging", QUICK_ROUNDS, "--threads", "1",
            "--summary-path", str(folder / "summary.json"), "--checkpoint-dir", str(folder), *self.common, *extra,
            env=env,
        )
        self.trainers.append(trainer)
        if wait:
            trainer.wait_until_up(timeout=90, until="training")
            if not self.first_address and trainer.initial_peers:
                self.first_address = trainer.initial_peers
        return trainer

    def finish(self, timeout: float = 300.0, indices: list[int] | None = None) -> dict[int, dict[str, Any]]:
        """Waits for the trainers (all, or `indices`) to exit; their summaries by index."""
        summaries = {}
        for index in indices if indices is not None else range(len(self.trainers)):
            trainer = self.trainers[index]
            code = trainer.process.wait(timeout)
            assert code == 0, f"trainer {index} exited with {code}: {trainer.stderr()}"
            summaries[index] = json.loads((self.directory / str(index) / "summary.json").read_text())
        return summaries

    def parameters(self, index: int) -> list[torch.Tensor]:
        """The parameters in trainer `index`'s final checkpoint."""
        state = load_saved_state(self.directory / str(index) / "trainer.pt")
        assert state is not None, f"trainer {index} left no checkpoint"
        count = len(state.metadata["layout"])
        return state.tensors[:count]

    def __enter__(self) -> TrainerSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.processes.close()


def epoch_totals(summaries: dict[int, dict[str, Any]]) -> dict[int, int]:
    """Samples all peers contributed to each epoch they finished."""
    totals: dict[int, int] = {}
    for summary in summaries.values():
        for record in summary["history"]:
            totals[record["epoch"]] = totals.get(record["epoch"], 0) + record["samples"]
    return totals

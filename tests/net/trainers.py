"""`apiary trainer` processes on the hosts of a `Network`, one participant per host.

    trainers = start_trainers(net.hosts, "run", tmp_path, ["--task-options", ..., "--max-epochs", "8"])
    for trainer in trainers:
        trainer.wait(180)
    summary = read_summary(tmp_path, 0)

The first host starts the run (embedded dht and averager) and the others join through it; each
trainer writes its summary to `<directory>/summary-<host index>.json` when it stops.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from net.network import Host
from net.processes import HostProcess


def summary_path(directory: Path, index: int) -> Path:
    return directory / f"summary-{index}.json"


def read_summary(directory: Path, index: int) -> dict[str, Any]:
    return json.loads(summary_path(directory, index).read_text())


def start_trainer(host: Host, run_id: str, initial_peers: str, directory: Path, options: list[str],
                  env: dict[str, str] | None = None) -> HostProcess:
    """`apiary trainer` on `host` with embedded services, joining `initial_peers` ('': a new swarm);
    its data seed is the host's index."""
    return host.apiary("trainer", "--run-id", run_id, "--seed", str(host.index),
                       *(["--initial-peers", initial_peers] if initial_peers else ["--new-swarm"]),
                       "--summary-path", str(summary_path(directory, host.index)), *options, env=env)


def start_trainers(hosts: list[Host], run_id: str, directory: Path, options: list[str],
                   timeout: float = 120.0, env: dict[int, dict[str, str]] | None = None) -> list[HostProcess]:
    """One trainer per host, all of run `run_id`; returns once every one has started (printed
    `training`: with `--min-peers`, it then waits for the run to have that many peers). `env`:
    environment variables of some trainers, by host index."""
    env = env or {}
    first = start_trainer(hosts[0], run_id, "", directory, options, env.get(0))
    bootstrap = first.wait_for(r"others join with: --initial-peers (\S+)", timeout).group(1)
    trainers = [first, *(start_trainer(host, run_id, bootstrap, directory, options, env.get(host.index))
                         for host in hosts[1:])]
    for trainer in trainers:
        trainer.wait_for(r"^training", timeout)
    return trainers

"""A swarm of averaging peers, one process each (or several in one), for tests.

    results = run_swarm([{"mode": "node", "weight": 1.0, "seed": 1}, {"mode": "client", ...}])
    results[0].final            # the first peer's tensors after its last round
    results[0].rounds[0].size   # the group size its first step returned (None: no group)

Each config is a `tests/averaging_worker.py` config without the parts the harness fills in
(`index`, `output`, `max_seconds`, and the start messages); one with `co_hosted` configs runs
those averagers in the same process too (not the first: it starts the DHT), and results list
every averager in that order. `kill_at(worker, when)` SIGKILLs a worker's process at a
wall-clock time: it is then left out of the results, as is a worker whose `fault_plan`
(`apiary.faults`) crashes it. All workers start at once (their imports run in parallel); the
first starts the DHT and the others join through it; once all are up, every worker is told
the same `t0`, and round r of every worker starts at `t0 + r * period`.
When every worker has written its results, their stdin is closed and they shut down. Whatever
happens (a worker fails, the test times out), every worker is killed on exit: no process is
left behind.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from averaging_worker import DEFAULTS, make_tensors

from apiary.faults import FaultPlan

REPO_ROOT = Path(__file__).resolve().parents[1]

__all__ = ["DEFAULTS", "AveragingSwarm", "PeerResult", "RoundRecord", "make_tensors", "run_swarm"]


@dataclass(frozen=True)
class RoundRecord:
    round: int
    size: int | None  # what step() returned
    members: list[str] | None  # peer ids of the group, sorted (None: no group)
    error: str | None  # repr of what step() raised
    started: float
    seconds: float
    codec: str
    banned: list[str] = field(default_factory=list)  # with verify_reductions: peers banned after the round
    audits: dict[str, int] = field(default_factory=dict)  # with verify_reductions: audited spans so far, by outcome


@dataclass
class PeerResult:
    index: int
    config: dict[str, Any]  # as the worker saw it (defaults filled in)
    peer_id: str
    initial: list[torch.Tensor]
    final: list[torch.Tensor]
    history: list[torch.Tensor]  # flattened tensors after each round
    rounds: list[RoundRecord]


@dataclass
class _Worker:
    index: int
    config: dict[str, Any]
    process: subprocess.Popen[bytes]
    stderr: IO[bytes]
    lines: queue.Queue[bytes | None] = field(default_factory=queue.Queue)

    @property
    def outputs(self) -> list[tuple[dict[str, Any], str]]:
        """The config and results file of each averager this worker hosts."""
        base = {k: v for k, v in self.config.items() if k != "co_hosted"}
        guests = self.config.get("co_hosted", [])
        return [(base, base["output"])] + [({**base, **guest}, f"{base['output']}.{k}") for k, guest in enumerate(guests, 1)]

    def start_reader(self) -> None:
        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=read, daemon=True).start()

    def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(message) + "\n").encode())
        self.process.stdin.flush()

    def expect(self, event: str, deadline: float) -> dict[str, Any]:
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"averaging worker {self.index}: no {event!r} in time\n{self.stderr_tail()}") from None
            if line is None:
                raise RuntimeError(f"averaging worker {self.index} exited ({self.process.poll()}) before {event!r}\n"
                                   f"{self.stderr_tail()}")
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a stray print
            if record.get("event") == event:
                return record

    def stderr_tail(self, chars: int = 4000) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-chars:]


class AveragingSwarm:
    """Runs one averaging worker per config; use as a context manager (kills all on exit)."""

    def __init__(self, configs: list[dict[str, Any]], *, start_timeout: float = 60.0, lead_seconds: float = 0.5):
        self.configs = configs
        self.start_timeout = start_timeout
        self.lead_seconds = lead_seconds
        self.workers: list[_Worker] = []
        self.peer_ids: list[str] = []
        self.t0: float | None = None
        self.exit_codes: dict[int, int | None] = {}
        self.killed: set[int] = set()  # workers meant to die: a SIGKILL (kill_at) or a crash in their fault_plan
        self._timers: list[threading.Timer] = []
        self.unclean: dict[int, str] = {}  # stderr of workers that did not exit with 0
        self._directory = tempfile.TemporaryDirectory(prefix="apiary-averaging-")

    def __enter__(self) -> AveragingSwarm:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _full_config(self, index: int, config: dict[str, Any]) -> dict[str, Any]:
        full = {**DEFAULTS, **config, "index": index, "output": os.path.join(self._directory.name, f"peer{index}.pt")}
        budget = self.start_timeout + float(full["rounds"]) * float(full["period"]) + 60.0
        full.setdefault("max_seconds", budget)
        full["max_seconds"] = max(float(full["max_seconds"]), budget)
        return full

    def start(self) -> None:
        if "co_hosted" in self.configs[0]:
            raise ValueError("the first worker starts the DHT: it hosts one averager, not co_hosted ones")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": _pythonpath()}
        for index, config in enumerate(self.configs):
            full = self._full_config(index, config)
            stderr = tempfile.TemporaryFile()
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.averaging_worker", "--config", json.dumps(full)],
                cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                start_new_session=True,
            )
            worker = _Worker(index, full, process, stderr)
            if any(fault.action == "crash" for fault in FaultPlan.parse(full["fault_plan"]).faults):
                self.killed.add(index)
            worker.start_reader()
            self.workers.append(worker)
        deadline = time.monotonic() + self.start_timeout
        first = self.workers[0]
        first.send({"initial_peer": None})
        up = {0: first.expect("up", deadline)}
        for worker in self.workers[1:]:
            worker.send({"initial_peer": up[0]["address"]})
        ids = {0: [up[0]["peer_id"]]}
        for worker in self.workers[1:]:
            ids[worker.index] = [worker.expect("up", deadline)["peer_id"] for _ in worker.outputs]
        self.peer_ids = [peer_id for worker in self.workers for peer_id in ids[worker.index]]
        self.t0 = time.time() + self.lead_seconds
        for worker in self.workers:
            worker.send({"t0": self.t0})

    def results(self, timeout: float) -> list[PeerResult]:
        """Waits (at most `timeout` seconds) until every worker wrote its results; returns them."""
        deadline = time.monotonic() + timeout
        alive = [worker for worker in self.workers if worker.index not in self.killed]
        for worker in alive:
            for _ in worker.outputs:
                worker.expect("done", deadline)
        results = []
        index = 0
        for worker in self.workers:
            for config, output in worker.outputs:
                if worker.index not in self.killed:
                    saved = torch.load(output, weights_only=False)
                    rounds = [RoundRecord(r["round"], r["size"], r["members"], r["error"], r["started"], r["seconds"],
                                          r["codec"], r.get("banned", []), r.get("audits", {})) for r in saved["rounds"]]
                    results.append(PeerResult(index, config, saved["peer_id"], saved["initial"], saved["final"],
                                              saved["history"], rounds))
                index += 1
        return results

    def kill_at(self, index: int, when: float) -> None:
        """SIGKILLs worker `index` (its whole process) at wall-clock time `when`, never to return."""
        self.killed.add(index)
        process = self.workers[index].process
        timer = threading.Timer(max(0.0, when - time.time()), _kill, (process,))
        timer.daemon = True
        timer.start()
        self._timers.append(timer)

    def stderr(self, index: int) -> str:
        return self.workers[index].stderr_tail()

    def close(self, timeout: float = 10.0) -> dict[int, int | None]:
        """Closes every worker's stdin (they shut down), kills those that linger; returns exit codes."""
        for timer in self._timers:
            timer.cancel()
        for worker in self.workers:
            try:
                if worker.process.stdin is not None:
                    worker.process.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill(worker.process)
                worker.process.wait(5)
            self.exit_codes[worker.index] = worker.process.returncode
            if worker.process.returncode != 0 and worker.index not in self.killed:
                self.unclean[worker.index] = worker.stderr_tail()
            if worker.process.stdout is not None:
                worker.process.stdout.close()
            worker.stderr.close()
        self._directory.cleanup()
        self.workers = []
        return self.exit_codes


def run_swarm(configs: list[dict[str, Any]], *, timeout: float | None = None,
              start_timeout: float = 60.0) -> list[PeerResult]:
    """Runs the swarm to the end and returns each worker's results (in config order); raises if
    a worker fails or does not exit cleanly. `timeout` bounds the rounds (default: the longest
    schedule plus 30 s)."""
    with AveragingSwarm(configs, start_timeout=start_timeout) as swarm:
        if timeout is None:
            timeout = max(float(w.config["rounds"]) * float(w.config["period"]) for w in swarm.workers) + 30.0
        results = swarm.results(timeout)
    if swarm.unclean:
        details = "\n".join(f"worker {i} (exit code {swarm.exit_codes[i]}):\n{tail}" for i, tail in swarm.unclean.items())
        raise RuntimeError(f"averaging workers did not shut down cleanly:\n{details}")
    return results


def _kill(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _pythonpath() -> str:
    own = f"{REPO_ROOT / 'src'}{os.pathsep}{REPO_ROOT / 'tests'}"  # the package, and the workers' helpers
    existing = os.environ.get("PYTHONPATH", "")
    return f"{existing}{os.pathsep}{own}" if existing else own  # a PYTHONPATH given wins (to test a copy)

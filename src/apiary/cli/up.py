"""`apiary up`: a local swarm of trainers on this machine, as processes, no containers.

Starts `--peers` participants, each one `apiary trainer` process with its embedded dht and
averager services: the first starts the swarm, the others join through it (one of them in
client mode with `--client`). Shows every participant's progress while they train for
`--duration` seconds, then prints a summary: held-out loss at the start and the end, samples
per second, epochs and bytes averaged. Ctrl-C stops every participant. A participant that
cannot start ends the command with its own error, as one `apiary: error:` line.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from apiary.cli.options import CommandError, option

console = Console()
EXPERT_SERVERS = {  # the MoE tasks: the flags of each of their expert servers
    "digits_moe": [["--experts", f"digits.{row}.[0:4]", "--hidden-size", "32"] for row in range(3)],  # a row each
    "moe_lm": [["--task", "moe_lm", "--num-experts", "16"] for _ in range(2)],  # half of the tiny grid each
}


def up_command(
    peers: Annotated[int, option("--peers", "how many local participants to start", min=1, max=64)] = 4,
    duration: Annotated[float, option("--duration", "seconds each participant trains", min=1)] = 90,
    task: Annotated[str, option("--task", "package.module:factory, or a built-in task: charlm")] = "charlm",
    target_batch_size: Annotated[int, option("--target-batch-size", "samples the swarm accumulates per epoch", min=1)] = 256,
    mode: Annotated[str, option("--mode", "gradients, local or diloco")] = "gradients",
    clients: Annotated[int, option("--clients", "how many of the participants run in client mode", min=0)] = 0,
) -> None:
    """Run a local swarm: train a task with several participants on this machine and summarize."""
    if clients >= peers:
        raise typer.BadParameter(f"{clients}: at least one of the --peers {peers} participants must accept connections",
                                 param_hint="'--clients'")
    with tempfile.TemporaryDirectory(prefix="apiary-up-") as folder:
        swarm = LocalSwarm(Path(folder), peers, ["--task", task, "--target-batch-size", str(target_batch_size),
                                                 "--mode", mode, "--max-seconds", str(duration)])
        try:
            if task in EXPERT_SERVERS:
                swarm.start_expert_servers(EXPERT_SERVERS[task])
            swarm.start(peers, clients)
            swarm.watch()
        except KeyboardInterrupt:
            console.print("stopping")
            interrupted = True
        else:
            interrupted = False
        finally:
            swarm.stop()
        swarm.report(required=not interrupted)
    if interrupted:
        raise SystemExit(130)


class LocalSwarm:
    """`apiary trainer` processes on this machine, each with embedded dht and averager services;
    they wait for each other (`--min-peers`), then train with the given trainer flags."""

    def __init__(self, folder: Path, peers: int, trainer_args: list[str]):
        self.folder = folder
        self.common = ["--run-id", "apiary-up", "--min-peers", str(peers), "--host", "127.0.0.1", "--threads", "1",
                       "--evaluate-every", "15", *trainer_args]
        self.processes: list[subprocess.Popen[str]] = []
        self.admin: list[str] = []
        self.infrastructure: list[subprocess.Popen[str]] = []  # dht and expert servers of an MoE task
        self.logs: dict[subprocess.Popen[str], Path] = {}
        self.first_peers = ""  # the first trainer starts a new swarm, unless the task has one

    def _spawn(self, index: int, initial_peers: str, client: bool) -> None:
        args = [*self.common, "--seed", str(index), *(["--initial-peers", initial_peers] if initial_peers else ["--new-swarm"]),
                "--summary-path", str(self.folder / f"{index}.json"), *(["--client-mode"] if client else [])]
        self.processes.append(self._process("trainer", args, self.folder / f"{index}.log", self.admin))

    def _process(self, command: str, args: list[str], log_path: Path, admin: list[str]) -> subprocess.Popen[str]:
        port = _free_port()
        log = open(log_path, "w")  # noqa: SIM115 - kept open for the process
        admin.append(f"http://127.0.0.1:{port}")
        process = subprocess.Popen([sys.executable, "-m", "apiary.cli.main", command, *args, "--admin-port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, text=True, preexec_fn=_stop_with_parent,
                                   start_new_session=True,  # Ctrl-C reaches `apiary up`, which stops them in order
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.logs[process] = log_path
        return process

    def _wait(self, name: str, process: subprocess.Popen[str], admin_url: str, condition: Any) -> Any:
        """`_wait_for_status`, failing with the process's own last error."""
        try:
            return _wait_for_status(process, admin_url, condition)
        except RuntimeError as e:
            raise CommandError(f"{name}: {e}: {_last_error(self.logs[process])}") from None

    def start_expert_servers(self, servers: list[list[str]]) -> None:
        """A dht service and an expert server per item of `servers` (its flags: the experts of an
        MoE task's grid it hosts); the trainers' task then reaches the experts through that dht service."""
        helpers: list[str] = []
        with console.status(f"starting a dht service and {len(servers)} expert servers"):
            self.infrastructure.append(self._process("dht", ["--new-swarm", "--host", "127.0.0.1"], self.folder / "dht.log",
                                                     helpers))
            dht = self._wait("the dht service", self.infrastructure[0], helpers[0],
                             lambda s: s.get("initial_peers_for_others"))
            for row, flags in enumerate(servers):
                self.infrastructure.append(self._process(
                    "expert-server", ["--host", "127.0.0.1", "--initial-peers", dht, *flags,
                                      "--lr", "0.003", "--declare-period", "2"],
                    self.folder / f"experts-{row}.log", helpers))
            for row, (process, url) in enumerate(zip(self.infrastructure[1:], helpers[1:])):
                self._wait(f"expert server {row}", process, url, lambda s: s.get("declared_at"))
        self.common += ["--task-options", json.dumps({"initial_peers": dht})]
        self.first_peers = dht

    def start(self, peers: int, clients: int) -> None:
        with console.status(f"starting {peers} participants"):
            self._spawn(0, self.first_peers, client=False)
            first = self._wait_for(0, lambda status: status.get("dht_address"))
            for index in range(1, peers):
                self._spawn(index, first, client=index >= peers - clients)
        console.print(f"swarm up: join it with  apiary trainer --run-id apiary-up --initial-peers {first}",
                      soft_wrap=True, highlight=False)

    def _wait_for(self, index: int, condition: Any) -> Any:
        return self._wait(f"participant {index}", self.processes[index], self.admin[index], condition)

    def _status(self, index: int) -> dict[str, Any] | None:
        return _status(self.admin[index])

    def wait(self) -> None:
        """Until every participant has exited."""
        for process in self.processes:
            process.wait()

    def summaries(self) -> list[dict[str, Any]]:
        """The summary of every participant that finished."""
        paths = (self.folder / f"{index}.json" for index in range(len(self.processes)))
        return [json.loads(path.read_text()) for path in paths if path.exists()]

    def watch(self) -> None:
        with Live(self._table(), console=console, refresh_per_second=2) as live:
            while any(p.poll() is None for p in self.processes):
                time.sleep(1)
                live.update(self._table())

    def _table(self) -> Table:
        table = Table(title="apiary local swarm")
        for column in ("peer", "loss", "epoch", "swarm epoch", "peers", "samples/s"):
            table.add_column(column, justify="right")
        for index, process in enumerate(self.processes):
            status = self._status(index) if process.poll() is None else None
            if status is None:
                table.add_row(str(index), "-", "-", "-", "-", "done" if process.poll() is not None else "starting")
                continue
            loss = status.get("loss")
            table.add_row(str(index), f"{loss:.3f}" if loss is not None else "-", str(status.get("local_epoch")),
                          str(status.get("swarm_epoch")), str(status.get("peers")), str(status.get("samples_per_second")))
        return table

    def stop(self) -> None:
        for process in [*self.processes, *self.infrastructure]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.processes, *self.infrastructure]:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def report(self, required: bool = True) -> None:
        """The summary table; with `required`, a CommandError when no participant finished."""
        summaries = self.summaries()
        missing = [f"participant {index}: {_last_error(self.logs[process])}" for index, process in enumerate(self.processes)
                   if not (self.folder / f"{index}.json").exists()]
        for line in missing:
            console.print(f"no summary from {line}", highlight=False)
        if not summaries:
            if required:
                raise CommandError("no participant finished" + (f"; {missing[0]}" if missing else ""))
            return
        table = Table(title="summary")
        for column in ("peer", "loss start", "loss end", "epochs", "samples/s", "MB averaged"):
            table.add_column(column, justify="right")
        for index, s in enumerate(summaries):
            table.add_row(str(index), str(s.get("loss_start")), str(s.get("loss_end")),
                          f"{s.get('epoch_start')} → {s.get('epoch_end')}", str(s.get("samples_per_second")),
                          f"{(s.get('averaged_bytes') or 0) / 1e6:.1f}")
        console.print(table)
        first = summaries[0]
        console.print(f"loss {first.get('loss_start')} → {min(s.get('loss_end') or 1e9 for s in summaries)}; "
                      f"swarm samples/s {sum(s.get('samples_per_second') or 0 for s in summaries):.0f}; "
                      f"epochs {max(s.get('epoch_end') or 0 for s in summaries)}", highlight=False)


def _status(admin_url: str) -> dict[str, Any] | None:
    try:
        return httpx.get(f"{admin_url}/status", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return None


def _wait_for_status(process: subprocess.Popen[str], admin_url: str, condition: Any, timeout: float = 120) -> Any:
    """Polls the process's /status until `condition` gives a value; raises RuntimeError if it ends or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"apiary {process.args[3]} ended early")  # type: ignore[index]
        status = _status(admin_url)
        if status is not None and (value := condition(status)):
            return value
        time.sleep(0.3)
    raise RuntimeError(f"apiary {process.args[3]} did not start within {timeout:.0f}s")  # type: ignore[index]


def _last_error(log_path: Path) -> str:
    """What a process said last: its `apiary: error:` line, else its last line (a traceback's exception)."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line.removeprefix("apiary: error:").strip() for line in lines if line.startswith("apiary: error:")]
    return (errors or lines or ["it wrote nothing"])[-1]


def _stop_with_parent() -> None:
    """Linux: SIGTERM the participant if `apiary up` itself dies (even by SIGKILL)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

"""A Docker engine for the container tests: the one already running, or `dockerd` started here.

    with docker_engine() as engine:       # raises EngineUnavailable(reason) where none can run
        engine.docker("images")

Where no engine answers, `docker_engine()` (as root) installs Debian's `docker.io`,
`docker-compose` and `debootstrap` if they are missing, starts `dockerd`, and on exit stops it
and removes what it changed on the host: the iptables rules and chains dockerd added, the
chain policies and IP forwarding it switched, and the `docker0` bridge. An engine that was
already running is left as it was.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from deploy import apt
from deploy.apt import find_tool

PACKAGES = {"dockerd": "docker.io", "docker-compose": "docker-compose", "debootstrap": "debootstrap"}
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


class EngineUnavailable(Exception):
    """No Docker engine can run here; the message says why."""


def ensure_tools() -> None:
    """Installs the missing ones of dockerd, docker-compose and debootstrap with apt-get."""
    try:
        apt.ensure_tools(PACKAGES)
    except apt.NotInstallable as e:
        raise EngineUnavailable(str(e)) from None


def compose_cli() -> str:
    """Debian's `docker-compose` (installed first where it is missing and we are root); raises
    EngineUnavailable where it cannot be had."""
    if find_tool("docker-compose") is None:
        if os.geteuid() != 0:
            raise EngineUnavailable("docker-compose is not installed, and installing it needs root")
        ensure_tools()
    compose = find_tool("docker-compose")
    if compose is None:
        raise EngineUnavailable("docker-compose is still missing after installing its package")
    return compose


@dataclass
class Engine:
    """Runs `docker` and `docker-compose` against the engine."""

    docker_cli: str
    compose_cli: str

    def docker(self, *args: str, timeout: float = 120, check: bool = True,
               input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        return _run([self.docker_cli, *args], timeout=timeout, check=check, input=input)

    def compose(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([self.compose_cli, *args], timeout=timeout, check=check)

    def answers(self) -> bool:
        return self.docker("info", "--format", "{{.ServerVersion}}", timeout=20, check=False).returncode == 0


def _run(command: list[str], *, timeout: float, check: bool,
         input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, timeout=timeout, input=input, check=False,
                            env=dict(os.environ, DOCKER_BUILDKIT="0", COMPOSE_DOCKER_CLI_BUILD="0"))
    text = subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(errors="replace"),
                                       result.stderr.decode(errors="replace"))
    if check and result.returncode != 0:
        raise AssertionError(f"`{shlex.join(command)}` exited {result.returncode}:\n{text.stdout[-3000:]}"
                             f"\n{text.stderr[-3000:]}")
    return text


@contextmanager
def docker_engine() -> Iterator[Engine]:
    """The running engine, or one started here (as root) and stopped, with its traces, on exit."""
    if os.geteuid() != 0:
        raise EngineUnavailable("not root: dockerd and debootstrap need root")
    ensure_tools()
    docker, compose = find_tool("docker"), find_tool("docker-compose")
    if docker is None or compose is None:
        raise EngineUnavailable("the docker or docker-compose command is missing")
    engine = Engine(docker, compose)
    if engine.answers():
        yield engine
        return
    dockerd = find_tool("dockerd")
    if dockerd is None:
        raise EngineUnavailable("dockerd is not installed")
    host = HostNetworkState.take()
    with tempfile.NamedTemporaryFile(prefix="apiary-dockerd-", suffix=".log") as log:
        process = subprocess.Popen([dockerd, "--host", "unix:///var/run/docker.sock"], stdout=log, stderr=log,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            _wait_until_answering(engine, process, Path(log.name))
            yield engine
        finally:
            _stop(process)
            host.undo_changes()


def _wait_until_answering(engine: Engine, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not engine.answers():
        if process.poll() is not None or time.monotonic() > deadline:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-4:])
            state = f"exited {process.returncode}" if process.poll() is not None else f"no answer in {START_TIMEOUT_S:.0f} s"
            raise EngineUnavailable(f"dockerd could not start ({state}): {tail}")
        time.sleep(0.5)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # dockerd stops its containerd and containers
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class HostNetworkState:
    """What dockerd changes on the host: iptables (filter, nat), IP forwarding, the docker0 bridge."""

    tables: dict[str, list[str]]
    ip_forward: str | None
    had_docker0: bool

    TABLES = ("filter", "nat")

    @classmethod
    def take(cls) -> HostNetworkState:
        return cls(
            tables={table: _iptables_save(table) for table in cls.TABLES},
            ip_forward=IP_FORWARD.read_text().strip() if IP_FORWARD.exists() else None,
            had_docker0=Path("/sys/class/net/docker0").exists(),
        )

    def undo_changes(self) -> None:
        """Deletes the rules and chains added since `take()` and restores policies and forwarding."""
        for table in self.TABLES:
            before, after = self.tables[table], _iptables_save(table)
            chains_before = _chains(before)
            for rule in (line for line in after if line.startswith("-A ") and line not in before):
                _iptables(table, "-D", *shlex.split(rule)[1:])
            for chain, policy in _chains(after).items():
                if chain not in chains_before:
                    _iptables(table, "-F", chain)
                    _iptables(table, "-X", chain)
                elif policy != "-" and policy != chains_before[chain]:
                    _iptables(table, "-P", chain, chains_before[chain])
        if self.ip_forward is not None:
            IP_FORWARD.write_text(self.ip_forward)
        if not self.had_docker0 and Path("/sys/class/net/docker0").exists():
            subprocess.run(["ip", "link", "delete", "docker0"], capture_output=True, timeout=30, check=False)


def _iptables_save(table: str) -> list[str]:
    if shutil.which("iptables-save") is None:
        return []
    result = subprocess.run(["iptables-save", "-t", table], capture_output=True, text=True, timeout=30, check=False)
    return [line for line in result.stdout.splitlines() if line.startswith(("-A ", ":"))]


def _chains(lines: list[str]) -> dict[str, str]:
    return {line[1:].split()[0]: line[1:].split()[1] for line in lines if line.startswith(":")}


def _iptables(table: str, *args: str) -> None:
    subprocess.run(["iptables", "-t", table, *args], capture_output=True, timeout=30, check=False)

"""`apiary <service>` commands run as real processes for tests, as an operator would run them.

    with ServiceProcesses() as services:
        dht = services.start("dht", "--new-swarm").wait_until_up()
        averager = services.start("averager", "--run-id", "r", "--initial-peers", dht.initial_peers)
        averager.wait_until_up()
        averager.status()  # GET /status of its admin endpoint

Each process gets a free admin port and 127.0.0.1 for every port it binds; its stdout is read by
a thread (so waiting for a line has a deadline even if the process prints nothing), its stderr
goes to a temporary file. On exit, every process still running is killed: none is left behind.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any

import httpx

from apiary.wire import Endpoint

APIARY = [sys.executable, "-m", "apiary.cli.main"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceProcess:
    def __init__(self, command: str, args: tuple[str, ...], admin_port: int, env: dict[str, str] | None = None,
                 host_flag: str = "--host"):
        self.command = command
        self.admin = f"http://127.0.0.1:{admin_port}"
        self.stderr_file: IO[bytes] = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [*APIARY, command, host_flag, "127.0.0.1", "--admin-port", str(admin_port), *args],
            stdout=subprocess.PIPE, stderr=self.stderr_file, stdin=subprocess.DEVNULL, text=True,
            env={**os.environ, "COLUMNS": "400", "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.output = ""
        self.local_api: Endpoint | None = None
        self.initial_peers = ""  # what others pass to join through this process's DHT node
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_until_up(self, timeout: float = 60.0, until: str = "local API: ") -> ServiceProcess:
        """Reads stdout until a line with `until` (by default the `local API: ...` line a service
        prints once it serves)."""
        self.wait_for_line(re.escape(until), timeout)
        return self

    def wait_for_line(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """Reads stdout until a line matches the regular expression `pattern`; returns the match.
        On the way it notes the `--initial-peers` value and the local API a service prints."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"apiary {self.command} printed no line matching {pattern!r} in {timeout:.0f}s: "
                                     f"{self.output}{self.stderr()}") from None
            if line is None:
                raise AssertionError(f"apiary {self.command} ended early ({self.process.wait(5)}): {self.output}"
                                     f"{self.stderr()}")
            self.output += line
            if found := re.search(r"others join with: --initial-peers (\S+)", line):
                self.initial_peers = found.group(1)
            if found := re.search(r"local API: (\S+)", line):
                self.local_api = Endpoint.parse(found.group(1))
            if match := re.search(pattern, line):
                return match

    def stderr(self) -> str:
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode(errors="replace")[-6000:]

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.admin}{path}", timeout=5)

    def status(self) -> dict[str, Any]:
        response = self.get("/status")
        response.raise_for_status()
        return response.json()

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM; returns the exit code (raises if the process outlives `timeout`)."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(10)
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.stderr_file.close()


class ServiceProcesses:
    """Starts `apiary` service processes; kills every one still running on exit."""

    def __init__(self) -> None:
        self.started: list[ServiceProcess] = []

    def start(self, command: str, *args: str, env: dict[str, str] | None = None,
              host_flag: str = "--host") -> ServiceProcess:
        """Starts `apiary <command> <args>`, with `env` over this process's environment; `host_flag`
        is the option given 127.0.0.1 (`--admin-host` for `apiary monitor`, which has no public port)."""
        service = ServiceProcess(command, args, free_port(), env, host_flag)
        self.started.append(service)
        return service

    def __enter__(self) -> ServiceProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for service in self.started:
            service.kill()

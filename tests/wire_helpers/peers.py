"""Starting and stopping `peer_server` processes from tests."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apiary.wire import Endpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0


@dataclass
class PeerProcess:
    """A running `python -m tests.wire_helpers.peer_server`; `stop()` always ends it."""

    args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def start(self) -> PeerProcess:
        self._stderr = tempfile.TemporaryFile()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.wire_helpers.peer_server", *self.args],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        try:
            self.info = json.loads(self._read_line(START_TIMEOUT))
        except BaseException:
            self.stop()
            raise
        return self

    def _read_line(self, timeout: float) -> bytes:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.1)
            if ready:
                line = self.process.stdout.readline()
                if line:
                    return line
            if self.process.poll() is not None:
                break
        raise RuntimeError(f"peer process did not report its ports: {self.stderr()}")

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-4000:]

    @property
    def pid(self) -> int:
        return int(self.info["pid"])

    @property
    def peer_id(self) -> str:
        return str(self.info["peer_id"])

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", int(self.info["port"]))

    @property
    def bulk_endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", int(self.info["bulk_port"]))

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def crash(self) -> None:
        """Kills the peer with SIGKILL (no shutdown at all), then reaps it."""
        assert self.process is not None
        self.process.kill()
        self.stop()

    def stop(self) -> None:
        """Closes the peer's stdin (it shuts down), then terminates or kills it if it lingers."""
        process = self.process
        if process is None:
            return
        try:
            if process.stdin is not None:
                process.stdin.close()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
        finally:
            if process.stdout is not None:
                process.stdout.close()
            self._stderr.close()

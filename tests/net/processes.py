"""A process running inside a host's network namespace, with its output captured.

    process = host.start([sys.executable, "-m", "apiary.cli.main", "dht", ...])
    match = process.wait_for(r"others join with: --initial-peers (\\S+)")
    process.output()        # every stdout line so far
    process.stderr()        # the tail of its stderr

It runs as `ip netns exec <namespace> setpriv --pdeathsig KILL -- <argv>` in a session of its
own: it dies with the test process even when that one is killed, and `kill()` ends its whole
process group. stdout is read by a thread (so a wait has a deadline even when the process
prints nothing); stderr goes to a temporary file.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import tempfile
import threading
import time
from typing import IO, Any

_JSON_LINE = re.compile(r"^\{.*\}\s*$")


class HostProcess:
    """One process in a namespace; see the module docstring."""

    def __init__(self, namespace: str, argv: list[str], env: dict[str, str], name: str, stdin: bool = False):
        self.name = name
        self.argv = argv
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", namespace, "setpriv", "--pdeathsig", "KILL", "--", *argv],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr,
            env=env, text=True, start_new_session=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._seen: list[str] = []
        self._results_read = 0  # lines before this one were looked at by result()
        threading.Thread(target=self._read, name=f"stdout of {name}", daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                self._lines.put(line)
        self._lines.put(None)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_for(self, pattern: str, timeout: float = 60.0, *, start: int = 0) -> re.Match[str]:
        """Reads stdout until a line matches `pattern` (looking from line `start` on); fails with
        the output so far if the process ends or `timeout` passes first."""
        return self._find(re.compile(pattern), timeout, start)[1]

    def _find(self, compiled: re.Pattern[str], timeout: float, start: int) -> tuple[int, re.Match[str]]:
        for number in range(start, len(self._seen)):
            if match := compiled.search(self._seen[number]):
                return number, match
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{self.name}: no line matching {compiled.pattern!r} in {timeout:.0f}s\n"
                                     f"{self.report()}") from None
            if line is None:
                self._lines.put(None)  # later waits see the end too
                raise AssertionError(f"{self.name} ended ({self.process.wait(5)}) before printing "
                                     f"{compiled.pattern!r}\n{self.report()}")
            self._seen.append(line)
            if match := compiled.search(line):
                return len(self._seen) - 1, match

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        """The next JSON object the process printed on a line of its own (a `net.tools` report, a
        worker's answer); each call returns the one after the previous call's."""
        number, match = self._find(_JSON_LINE, timeout, self._results_read)
        self._results_read = number + 1
        return json.loads(match.group(0))

    def output(self) -> str:
        """stdout lines read so far (by `wait_for`) plus any waiting in the queue."""
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._lines.put(None)
                break
            self._seen.append(line)
        return "".join(self._seen)

    def send(self, text: str) -> None:
        """Writes a line to the process's stdin (started with `stdin=True`)."""
        assert self.process.stdin is not None
        self.process.stdin.write(text if text.endswith("\n") else text + "\n")
        self.process.stdin.flush()

    def stderr(self, chars: int = 6000) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-chars:]

    def report(self) -> str:
        return f"--- stdout of {self.name}:\n{self.output()[-4000:]}\n--- stderr of {self.name}:\n{self.stderr()}"

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM; returns the exit code (raises if the process outlives `timeout`)."""
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILLs the process group (also what the process started) and reaps the process."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        self.kill()
        if self.process.stdin is not None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        self._stderr.close()

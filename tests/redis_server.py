"""A real `redis-server` for tests: on a free loopback port, in its own temporary directory.

    with RedisServer() as server:
        ... server.url ...          # "redis://127.0.0.1:PORT/0"
        server.restart()            # same port and data directory: data survives (AOF)

The server is shut down and waited for on exit, so no process is left behind.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from pathlib import Path

try:  # pytest puts tests/ on sys.path (no tests/__init__.py); `python -m` runs from the root
    from tools.ensure_redis import find_redis_server
except ImportError:  # pragma: no cover
    from tests.tools.ensure_redis import find_redis_server

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """Starts `redis-server` on enter (or `start()`), stops it on exit (or `stop()`)."""

    def __init__(self, binary: str | None = None) -> None:
        found = binary or find_redis_server()
        if found is None:
            raise RuntimeError("redis-server not installed: run `python -m tests.tools.ensure_redis` as root")
        self.binary = found
        self.port = free_port()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def directory(self) -> Path:
        assert self._tmp is not None, "RedisServer is not started"
        return Path(self._tmp.name)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="apiary-redis-")
        log = self.directory / "redis.log"
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--logfile", str(log),
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        try:
            self._wait_until_ready(log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Shuts the server down gracefully (AOF flushed) and waits for the process."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()  # redis-server finishes its AOF and exits on SIGTERM
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def restart(self) -> None:
        """Stops and starts again on the same port with the same data directory."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _wait_until_ready(self, log: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"redis-server on port {self.port} exited with {self._process.returncode}: {_tail(log)}"
                )
            if _answers_ping(self.port):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server on port {self.port} did not answer PING within {START_TIMEOUT_S} s: "
                    f"{_tail(log)}"
                )
            time.sleep(0.02)


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _tail(log: Path, lines: int = 5) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:]) or "(empty log)"
    except OSError:
        return "(no log)"


__all__ = ["RedisServer", "free_port"]

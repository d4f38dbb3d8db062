"""Logging of the services (apiary.logs): `--log-format json` makes the whole output of a service
one JSON object per line, with its lifecycle events at INFO; `--log-level` filters; a wrong value
is refused with a clear error."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time

from service_processes import free_port

APIARY = [sys.executable, "-m", "apiary.cli.main"]


def _run_dht(*process_args: str, env: dict[str, str] | None = None, until: str, timeout: float = 120.0) -> list[str]:
    """Runs `apiary [process_args] dht` (stdout and stderr together) until a line contains `until`;
    returns the lines read, the process stopped."""
    process = subprocess.Popen(
        [*APIARY, *process_args, "dht", "--new-swarm", "--host", "127.0.0.1", "--port", "0", "--plaintext", "--local-port", "0",
         "--admin-port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {until!r} in {timeout:.0f} s: {seen}") from None
            if line is None:
                raise AssertionError(f"apiary dht ended ({process.wait(5)}) before {until!r}: {seen}")
            seen.append(line)
            if until in line:
                return seen
    finally:
        process.terminate()  # within moments of the ready line: that once stalled the shutdown
        try:
            process.wait(60)
        finally:
            process.kill()  # no-op once it ended
        if process.stdout is not None:
            process.stdout.close()


def test_json_format_gives_one_object_per_line_with_the_lifecycle_events() -> None:
    lines = _run_dht(env={"APIARY_LOG_FORMAT": "json"}, until='"event": "ready"')
    entries = [json.loads(line) for line in lines]  # every line of the output parses
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    events = [entry["event"] for entry in entries if "event" in entry]
    assert events.index("started") < events.index("joined") < events.index("ready"), events
    started = next(entry for entry in entries if entry.get("event") == "started")
    assert started["level"] == "INFO" and "peer id" in started["message"]
    printed = [entry["message"] for entry in entries if entry["logger"] == "apiary.stdout"]
    assert any(message.startswith("local API: ") for message in printed), printed  # what the command prints too


def test_text_format_and_level_flags() -> None:
    text = _run_dht("--log-level", "debug", until="dht ready: ")
    started = next(line for line in text if " dht started: " in line)
    assert started.split()[1] == "INFO" and started.split()[2] == "apiary.services.host:"
    assert any(line.split()[1:2] == ["DEBUG"] for line in text if line[:4].isdigit()), text
    quiet = _run_dht("--log-level", "warning", until="local API: ")
    assert not any(" INFO " in line for line in quiet), quiet


def test_a_wrong_level_or_format_is_refused_naming_it() -> None:
    for args, named in ((["--log-level", "loud"], "'loud'"), (["--log-format", "xml"], "'xml'")):
        result = subprocess.run([*APIARY, *args, "version"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert named in result.stderr and "not one of" in result.stderr, result.stderr

"""The process's log output: a level and a format (`--log-level`, `--log-format`, or
`APIARY_LOG_LEVEL`, `APIARY_LOG_FORMAT`), one line per event.

    configure("info", "json")

text: `2026-12-04T20:50:01.123Z INFO apiary.services.host: dht started: ...` on stderr.
json: one JSON object per line on stderr (`time`, `level`, `logger`, `message`, plus `event`
when the line marks a lifecycle event, and `exception` with a traceback), and what the command
prints on stdout becomes one such object per line too (logger `apiary.stdout`), so that a log
collector can parse the whole output of a container line by line.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from enum import Enum
from typing import Any, TextIO


class LogFormat(str, Enum):
    TEXT = "text"
    JSON = "json"


LEVELS = ("debug", "info", "warning", "error")
STDOUT_LOGGER = "apiary.stdout"
# Libraries whose INFO lines are per-request noise: they log from WARNING on.
QUIET = ("uvicorn.access", "httpx", "httpcore")


_handler: logging.Handler | None = None  # the one configure() installed


class LogError(ValueError):
    """A log level or format that does not exist."""


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += " | " + " | ".join(self.formatException(record.exc_info).splitlines())
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": _timestamp(record.created), "level": record.levelname,
                                 "logger": record.name, "message": record.getMessage()}
        event = getattr(record, "event", None)
        if event:
            entry["event"] = event
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class LinesToLog(io.TextIOBase):
    """A text stream that logs each complete line written to it (INFO, `apiary.stdout`)."""

    def __init__(self) -> None:
        self._partial = ""
        self._logger = logging.getLogger(STDOUT_LOGGER)

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self._logger.info(line.rstrip())
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def configure(level: str = "info", log_format: str | LogFormat = LogFormat.TEXT, *,
              stream: TextIO | None = None) -> None:
    """Sends every logger's records at `level` and above to stderr (or `stream`) in `log_format`;
    json also turns stdout's lines into records. Raises LogError naming a wrong level or format."""
    if level.lower() not in LEVELS:
        raise LogError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    try:
        log_format = LogFormat(log_format.lower() if isinstance(log_format, str) else log_format)
    except ValueError:
        raise LogError(f"log format {log_format!r} is not one of text, json") from None
    global _handler
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format is LogFormat.JSON else TextFormatter())
    root = logging.getLogger()
    if _handler is not None:  # configured before in this process: replaced (others' handlers stay)
        root.removeHandler(_handler)
    _handler = handler
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    logging.getLogger(STDOUT_LOGGER).setLevel(logging.INFO)  # what a command prints is never filtered out
    if log_format is LogFormat.JSON and not isinstance(sys.stdout, LinesToLog):
        sys.stdout.flush()
        sys.stdout = LinesToLog()

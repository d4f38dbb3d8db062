"""What the test worker processes share: JSON-line output and dying with their parent."""

from __future__ import annotations

import json
import signal
import sys
from typing import Any


def emit(record: dict[str, Any]) -> None:
    """Writes one JSON line to stdout, flushed, for the harness that reads it."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the process that started it dies, even while it is
    stopped (SIGSTOP) and cannot notice that stdin closed."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

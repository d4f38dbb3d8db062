"""The clock code reads time from: wall time (expirations, reports) and monotonic time (intervals,
deadlines). Injected, with the real one as the default, so that a simulator can run the same code
in virtual time (`tests/sim`)."""

from __future__ import annotations

import time as _time
from collections.abc import Callable
from dataclasses import dataclass


def _wall() -> float:
    return _time.time()  # looked up at each call (tests may replace time.time)


def _monotonic() -> float:
    return _time.monotonic()


@dataclass(frozen=True)
class Clock:
    time: Callable[[], float] = _wall  # seconds since the epoch
    monotonic: Callable[[], float] = _monotonic  # seconds, for intervals only


REAL = Clock()

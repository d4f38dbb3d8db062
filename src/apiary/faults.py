"""Failure injection points, for tests: make a process crash, hang or fail at a chosen round or epoch.

A test tool, not an operator's: it exists so that tests can stage a failure at an exact step
(a peer that dies after its group formed in round 2, a trainer that crashes in epoch 3) instead
of killing a process after a guessed sleep. The code under test marks named points with the
round or epoch it is at:

    await faults.reached_async("averager.round", round_index)   # in async code
    faults.reached("trainer.epoch", optimizer.epoch)            # in a thread

A plan says what happens at which point, as `POINT=INDEX:ACTION`, several separated by commas:

    APIARY_FAULTS="averager.round=2:crash"              # exit at once (no cleanup, no goodbye)
    APIARY_FAULTS="trainer.epoch=3:hang:20,trainer.epoch=5:raise"

Each fault fires once, the first time its point is reached at INDEX or later (a peer may skip
rounds or epochs). Actions: `crash` ends the process at once with `CRASH_EXIT_CODE` (like a
SIGKILL: nothing is flushed or closed), `hang:SECONDS` holds the caller there (the rest of the
process keeps running: an async point sleeps on its event loop), `raise` raises `InjectedFault`.

The `apiary` command installs the plan of its hidden `--faults` flag (`APIARY_FAULTS`); other
programs (test workers) call `install()`. With no plan installed a point costs one global read.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from dataclasses import dataclass

CRASH_EXIT_CODE = 86  # what a crash fault exits with: tests tell it from other failures
ACTIONS = ("crash", "hang", "raise")
POINTS = {
    "averager.round": "an averager's round (its step's round number): the group is formed, the all-reduce not started",
    "trainer.epoch": "a trainer's epoch loop (this peer's epoch), before it trains the next batch",
}


class FaultSpecError(ValueError):
    """A fault plan that cannot be parsed; the message names the faulty entry and why."""


class InjectedFault(RuntimeError):
    """What a `raise` fault raises."""


@dataclass(frozen=True)
class Fault:
    point: str
    at: int  # the round or epoch from which it fires (once)
    action: str  # one of ACTIONS
    seconds: float = 0.0  # how long a hang lasts

    def __str__(self) -> str:
        return f"{self.action} at {self.point} {self.at}"


class FaultPlan:
    """The faults still to fire, by point; each fires once (thread-safe)."""

    def __init__(self, faults: list[Fault]):
        self._pending: dict[str, list[Fault]] = {}
        for fault in sorted(faults, key=lambda f: f.at):
            self._pending.setdefault(fault.point, []).append(fault)
        self._lock = threading.Lock()

    @classmethod
    def parse(cls, spec: str) -> FaultPlan:
        """The plan of `POINT=INDEX:ACTION[,...]` (see the module's docstring); FaultSpecError if malformed."""
        return cls([_parse_entry(entry.strip()) for entry in spec.split(",") if entry.strip()])

    @property
    def faults(self) -> list[Fault]:
        """The faults that have not fired yet."""
        with self._lock:
            return [fault for pending in self._pending.values() for fault in pending]

    def due(self, point: str, index: int) -> Fault | None:
        """The fault that fires now at `point`, reached at round or epoch `index` (taken off the plan)."""
        with self._lock:
            pending = self._pending.get(point)
            if pending and pending[0].at <= index:
                return pending.pop(0)
            return None


_plan: FaultPlan | None = None


def install(plan: FaultPlan | None) -> None:
    """Makes `plan` this process's plan (None: none; points then cost one global read)."""
    global _plan
    _plan = plan if plan is not None and plan.faults else None


def reached(point: str, index: int) -> None:
    """Marks `point` at round or epoch `index` in synchronous code: a due fault fires here (a hang sleeps the thread)."""
    if _plan is not None and (fault := _plan.due(point, index)) is not None:
        time.sleep(_fire(fault, index))


async def reached_async(point: str, index: int) -> None:
    """Marks `point` at round or epoch `index` in async code: a due fault fires here (a hang sleeps this task only)."""
    if _plan is not None and (fault := _plan.due(point, index)) is not None:
        await asyncio.sleep(_fire(fault, index))


def _fire(fault: Fault, index: int) -> float:
    """Says what fires (on stderr, unbuffered: a crash flushes nothing); crashes, raises, or returns a hang's seconds."""
    os.write(sys.stderr.fileno(), f"apiary: fault injection: {fault} (reached at {index})\n".encode())
    if fault.action == "crash":
        os._exit(CRASH_EXIT_CODE)
    if fault.action == "raise":
        raise InjectedFault(f"fault injection: {fault}")
    return fault.seconds


def _parse_entry(entry: str) -> Fault:
    def bad(why: str) -> FaultSpecError:
        return FaultSpecError(f"fault {entry!r}: {why} (expected POINT=INDEX:crash, POINT=INDEX:raise or "
                              f"POINT=INDEX:hang:SECONDS)")

    point, equals, rest = entry.partition("=")
    point = point.strip()
    if not equals:
        raise bad("no '='")
    if point not in POINTS:
        raise bad(f"unknown point {point!r}; the points are {', '.join(sorted(POINTS))}")
    index, _, action = (part.strip() for part in rest.partition(":"))
    if not index.isdigit():
        raise bad(f"the round or epoch must be a whole number >= 0, got {index!r}")
    name, _, argument = (part.strip() for part in action.partition(":"))
    if name not in ACTIONS:
        raise bad(f"unknown action {name!r}; the actions are {', '.join(ACTIONS)}")
    if name != "hang":
        if argument:
            raise bad(f"{name} takes no argument, got {argument!r}")
        return Fault(point, int(index), name)
    try:
        seconds = float(argument)
    except ValueError:
        raise bad(f"hang needs its seconds, got {argument!r}") from None
    if not 0 <= seconds < float("inf"):
        raise bad(f"hang needs seconds >= 0, got {argument!r}")
    return Fault(point, int(index), name, seconds)

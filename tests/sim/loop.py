"""Virtual time for asyncio: an event loop whose clock jumps to the next timer when nothing is
ready, so `asyncio.sleep`, `wait_for` and every deadline run in simulated seconds, none waited."""

from __future__ import annotations

import asyncio
import random
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

from apiary.clock import Clock

T = TypeVar("T")
ORIGIN = 1_800_000_000.0  # the simulation's wall time at virtual 0 (fixed: runs replay exactly)


class SimulationStuck(RuntimeError):
    """Nothing is ready and no timer is set: every task waits on something that never comes."""


class _Selector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Polls the loop's own file descriptors (its self-pipe) without blocking; an idle wait moves
    the virtual clock to the next timer instead."""

    loop: VirtualLoop | None = None

    def select(self, timeout: float | None = None) -> list[Any]:
        events = super().select(0)
        if events or self.loop is None or timeout == 0:
            return events
        if timeout is None:
            raise SimulationStuck("no task is ready and none waits on a timer")
        self.loop.now += timeout
        return events


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.now = 0.0
        selector = _Selector()
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        return self.now

    @property
    def clock(self) -> Clock:
        """The clock the simulated code reads (`apiary.clock`): wall time ORIGIN + virtual time."""
        return Clock(time=lambda: ORIGIN + self.now, monotonic=lambda: self.now)


def run(main: Coroutine[Any, Any, T], seed: int = 0) -> T:
    """Runs `main` on a new virtual-time loop (the global `random` seeded with `seed`, which the
    DHT's bucket refreshes draw from), and closes it."""
    random.seed(seed)
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(main)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def clock() -> Clock:
    """The running virtual loop's clock."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualLoop), "not in a simulation (tests.sim.loop.run)"
    return loop.clock

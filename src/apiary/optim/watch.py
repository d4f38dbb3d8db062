"""The optimizer's background side: publishes this peer's progress, reads the swarm's, and has
the averager form a round's group ahead when the epoch controller says it is due.

It runs on the optimizer's event loop and reads only frozen snapshots: `local()` gives the
training thread's latest `LocalProgress`, and what it reads of the swarm it hands back whole as
`view`. `prepared_epoch` is the latest epoch whose group the averager was asked to form ahead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from apiary.background import LoopThread
from apiary.optim.epochs import EpochController, LocalProgress
from apiary.optim.progress import SwarmProgress
from apiary.optim.swarm import Swarm

logger = logging.getLogger(__name__)


class SwarmWatch:
    def __init__(self, loop: LoopThread, swarm: Swarm, controller: EpochController,
                 local: Callable[[], LocalProgress], params: Sequence[torch.Tensor]):
        self.loop = loop
        self.swarm = swarm
        self.controller = controller
        self.local = local
        self.params = params  # shaped like the gradient rounds' tensors
        self.view: SwarmProgress | None = None
        self.prepared_epoch = -1
        self._task: concurrent.futures.Future[None] | None = None

    def start(self) -> None:
        self._task = self.loop.submit(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def refresh(self) -> SwarmProgress | None:
        """Publishes this peer's progress and reads the swarm's now (from the training thread); the latest view."""
        try:
            self.view = self.loop.run(self._refresh(), timeout=self.controller.refresh_period * 4 + 5)
        except Exception as e:  # noqa: BLE001 - the next step tries again
            logger.warning("reading the swarm's progress failed: %s", e)
        return self.view

    def publish(self, local: LocalProgress) -> None:
        """Tells the swarm `local` in the background."""
        self.loop.submit(self._publish(local))

    async def _publish(self, local: LocalProgress) -> None:
        await logged(self.swarm.publish_progress(local.epoch, local.samples, local.published_speed),
                     "publishing progress")

    async def _refresh(self) -> SwarmProgress:
        await self._publish(self.local())
        return await self.swarm.fetch_progress()

    async def _run(self) -> None:
        while True:
            try:
                self.view = view = await self._refresh()
                local = self.local()
                if self.controller.preparation_due(local, view, self.prepared_epoch, self.swarm.matchmaking_seconds,
                                                   time.monotonic()):
                    if await self.swarm.prepare(self.params, round_index=local.epoch):  # False: busy, ask again
                        self.prepared_epoch = local.epoch
            except Exception as e:  # noqa: BLE001 - the next refresh tries again
                logger.warning("reading the swarm's progress failed: %s", e)
            await asyncio.sleep(self.controller.refresh_interval(self.local(), self.view, time.monotonic()))


async def logged(coroutine: Any, what: str) -> Any:
    """Awaits `coroutine`; a failure is logged (as `what` failed), and gives None."""
    try:
        return await coroutine
    except Exception as e:  # noqa: BLE001
        logger.warning("%s failed: %s", what, e)
        return None

"""The optimizer's averaging rounds: run on its event loop through the `Swarm`, counted as they end."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from apiary.averaging.api.client import Outcome
from apiary.background import LoopThread
from apiary.optim.rules import RoundFuture, RoundGroup
from apiary.optim.swarm import Swarm

logger = logging.getLogger(__name__)


class SwarmRounds:
    """`Rounds` with `swarm` on `loop`. `alone()` tells when this peer is the run's only one (a
    round then has nobody to meet and is skipped). `counts`: rounds that found a group or not."""

    def __init__(self, loop: LoopThread, swarm: Swarm, round_timeout: float, alone: Callable[[], bool]):
        self.loop = loop
        self.swarm = swarm
        self.round_timeout = round_timeout
        self.alone = alone
        self.counts = {"ok": 0, "no_group": 0}
        self.last_outcome: Outcome | None = None  # of the latest round

    def start(self, tensors: list[torch.Tensor], weight: float, round_index: int) -> RoundFuture:
        return self.loop.submit(self.average(tensors, weight, round_index))

    async def average(self, tensors: list[torch.Tensor], weight: float, round_index: int) -> RoundGroup | None:
        """A round with the swarm; none when this peer is alone in the run (nobody to average with)."""
        self.last_outcome = None
        if self.alone():
            return None
        size = await self.swarm.average(tensors, weight, round_index)
        self.last_outcome = outcome = self.swarm.last_outcome
        return RoundGroup(size, outcome.members if outcome is not None else ()) if size else None

    def result(self, future: RoundFuture, what: str) -> RoundGroup | None:
        try:
            group = future.result(self.round_timeout + 30)
        except Exception as e:  # noqa: BLE001 - the peer updates alone and carries on
            logger.warning("%s failed: %s", what, e)
            group = None
        self.counts["ok" if group else "no_group"] += 1
        return group

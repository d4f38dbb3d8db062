"""How a collaborative optimizer reaches its run: the DHT for progress, an averager for rounds.

`SwarmLink.connect()` uses the participant's dht and averager services through their local
APIs (the trainer service's usual case). `SwarmLink.embedded()` has both services started inside
this process first (library use, `apiary up`, tests: `apiary.services.embedded` starts them; this
layer imports no service) and then talks to them the same way, so there is one code path
whatever the deployment.

Rounds and state go through the averager service's local API (`AveragerClient`), which holds
one registered schema at a time: the link re-registers when the optimizer switches between
averaging gradients and averaging its state. `prepare()` has the averager form a round's group
ahead of time, for the schema of the tensors that round will average.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from apiary.averaging.local import AveragerClient, Outcome
from apiary.dht.api import DHTClient
from apiary.wire import ChannelPool, Endpoint, RequestRejected

logger = logging.getLogger(__name__)


class EmbeddedServices(Protocol):
    """A participant's dht and averager services started in this process (`apiary.services.embedded`)."""

    @property
    def dht_local(self) -> Endpoint: ...

    @property
    def averager_local(self) -> Endpoint: ...

    @property
    def dht_address(self) -> str | None: ...  # what others join through

    async def close(self) -> None: ...


@dataclass
class SwarmLink:
    """The DHT, the averager and this peer's id (the DHT identity that signs its records)."""

    dht: DHTClient
    averager: AveragerClient
    peer_id: str
    client_mode: bool
    pool: ChannelPool
    services: EmbeddedServices | None = None  # started for this link, stopped by close()
    _registered: tuple[tuple[tuple[int, ...], torch.dtype], ...] | None = None
    _registering: asyncio.Lock = field(default_factory=asyncio.Lock)  # a schema stays registered until its call ends

    @classmethod
    async def connect(cls, dht_local: Endpoint | str, averager_local: Endpoint | str, *,
                      timeout: float = 30.0, round_timeout: float = 300.0) -> SwarmLink:
        """Links to the participant's running dht and averager services (fails at once if either is down)."""
        pool = ChannelPool()
        dht = DHTClient(Endpoint.parse(dht_local) if isinstance(dht_local, str) else dht_local, pool, timeout=timeout)
        try:
            info = await dht.info()
        except BaseException:
            await pool.close()
            raise
        averager = AveragerClient(averager_local, pool, timeout=timeout, round_timeout=round_timeout)
        return cls(dht, averager, info.peer_id, info.client_mode, pool)

    @classmethod
    async def embedded(cls, starting: Awaitable[EmbeddedServices], *, round_timeout: float = 300.0) -> SwarmLink:
        """Links to the services `starting` starts in this process; the link stops them at close()."""
        services = await starting
        try:
            link = await cls.connect(services.dht_local, services.averager_local, round_timeout=round_timeout)
        except BaseException:
            await services.close()
            raise
        link.services = services
        return link

    @property
    def dht_address(self) -> str | None:
        """The address others join through (embedded, non-client peers only)."""
        if self.services is not None and not self.client_mode:
            return self.services.dht_address
        return None

    async def average(self, tensors: Sequence[torch.Tensor], weight: float, round_index: int) -> int | None:
        """Averages `tensors` in place in round `round_index`; the group size, or None (unchanged)."""
        async with self._registering:
            await self._register(tensors)
            return await self.averager.average(tensors, weight, round=round_index)

    async def prepare(self, tensors: Sequence[torch.Tensor], round_index: int) -> bool:
        """Has the averager form the group of round `round_index` now, for tensors shaped like
        `tensors`; False if it is busy (a round in flight, or a group being formed)."""
        if self._registering.locked():
            return False
        async with self._registering:
            await self._register(tensors)
            return await self.averager.prepare(round_index)

    async def register(self, tensors: Sequence[torch.Tensor]) -> None:
        """Declares the schema of the next rounds (average() and prepare() do it when it changes)."""
        async with self._registering:
            await self._register(tensors)

    @property
    def matchmaking_seconds(self) -> float:
        """How long the averager takes to form a group (known once a schema is registered)."""
        return self.averager.matchmaking_seconds

    @property
    def last_outcome(self) -> Outcome | None:
        """How the latest round went: result, group size, whether its group was formed ahead."""
        return self.averager.last_outcome

    async def _register(self, tensors: Sequence[torch.Tensor]) -> None:
        schema = tuple((tuple(t.shape), t.dtype) for t in tensors)
        if schema != self._registered:
            await self.averager.register(tensors, use_shared_memory=True)
            self._registered = schema

    async def publish_state(self, metadata: dict[str, Any], tensors: Sequence[torch.Tensor]) -> None:
        await self.averager.publish_state(metadata, tensors)

    async def load_state(self, timeout: float) -> tuple[dict[str, Any], list[torch.Tensor]] | None:
        """The swarm's newest state, or None when no peer gives one within `timeout` seconds."""
        try:
            return await self.averager.load_state(timeout=timeout)
        except RequestRejected as e:
            logger.info("no state loaded from the swarm: %s", e)
            return None

    @property
    def averaged_bytes(self) -> int:
        """Tensor bytes the averager sent and received in this link's rounds (as its replies report them)."""
        return self.averager.averaged_bytes

    async def close(self) -> None:
        await self.averager.close()
        await self.pool.close()
        if self.services is not None:
            await self.services.close()

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

`Swarm` is all the optimizer needs of a run: progress, rounds, state. `SwarmLink` is the one
used in training; tests drive the optimizer with an in-memory one.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from apiary.averaging.api.client import AveragerClient, Outcome
from apiary.dht.api import DHTClient
from apiary.optim.progress import ProgressTracker, SwarmProgress
from apiary.wire import ChannelPool, Endpoint, NotFound, PeerAddress, WireSettings

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


class StartEmbedded(Protocol):
    """Starts a participant's dht and averager services in this process (`apiary.services.embedded`)."""

    def __call__(self, run_id: str, initial_peers: Sequence[PeerAddress], *, averaging: dict[str, Any] | None,
                 client_mode: bool, auxiliary: bool, wire: WireSettings | None,
                 identity: Path | None) -> Awaitable[EmbeddedServices]: ...


class Swarm(Protocol):
    """What the optimizer needs of its run (call from one event loop)."""

    @property
    def peer_id(self) -> str: ...

    @property
    def client_mode(self) -> bool: ...

    @property
    def matchmaking_seconds(self) -> float: ...

    @property
    def last_outcome(self) -> Outcome | None: ...

    @property
    def dht_address(self) -> str | None: ...

    @property
    def averaged_bytes(self) -> int: ...

    async def publish_progress(self, epoch: int, samples: int, samples_per_second: float) -> bool: ...

    async def fetch_progress(self) -> SwarmProgress: ...

    async def register(self, tensors: Sequence[torch.Tensor]) -> None: ...

    async def prepare(self, tensors: Sequence[torch.Tensor], round_index: int) -> bool: ...

    async def average(self, tensors: Sequence[torch.Tensor], weight: float, round_index: int) -> int | None: ...

    async def publish_state(self, metadata: dict[str, Any], tensors: Sequence[torch.Tensor]) -> None: ...

    async def load_state(self, timeout: float) -> tuple[dict[str, Any], list[torch.Tensor]] | None: ...

    async def close(self) -> None: ...


@dataclass
class SwarmLink:
    """The DHT, the averager and this peer's id (the DHT identity that signs its records); the
    run's progress records through `tracker`."""

    dht: DHTClient
    averager: AveragerClient
    peer_id: str
    client_mode: bool
    pool: ChannelPool
    tracker: ProgressTracker
    services: EmbeddedServices | None = None  # started for this link, stopped by close()
    _registered: tuple[tuple[tuple[int, ...], torch.dtype], ...] | None = None
    _registering: asyncio.Lock = field(default_factory=asyncio.Lock)  # a schema stays registered until its call ends

    @classmethod
    async def connect(cls, run_id: str, dht_local: Endpoint | str, averager_local: Endpoint | str, *,
                      timeout: float = 30.0, round_timeout: float = 300.0,
                      max_samples_per_second: float = math.inf) -> SwarmLink:
        """Links to the participant's running dht and averager services for run `run_id` (fails
        at once if either is down); `max_samples_per_second`: the most a peer is believed to count."""
        pool = ChannelPool()
        dht = DHTClient(Endpoint.parse(dht_local) if isinstance(dht_local, str) else dht_local, pool, timeout=timeout)
        try:
            info = await dht.info()
        except BaseException:
            await pool.close()
            raise
        averager = AveragerClient(averager_local, pool, timeout=timeout, round_timeout=round_timeout)
        tracker = ProgressTracker(dht, run_id, info.peer_id, client=info.client_mode,
                                  max_samples_per_second=max_samples_per_second)
        return cls(dht, averager, info.peer_id, info.client_mode, pool, tracker)

    @classmethod
    async def embedded(cls, run_id: str, starting: Awaitable[EmbeddedServices], *, round_timeout: float = 300.0,
                       max_samples_per_second: float = math.inf) -> SwarmLink:
        """Links to the services `starting` starts in this process; the link stops them at close()."""
        services = await starting
        try:
            link = await cls.connect(run_id, services.dht_local, services.averager_local, round_timeout=round_timeout,
                                     max_samples_per_second=max_samples_per_second)
        except BaseException:
            await services.close()
            raise
        link.services = services
        return link

    @classmethod
    def open(cls, run_id: str, dht_local: Endpoint | str | None, averager_local: Endpoint | str | None,
             start_embedded: StartEmbedded | None, initial_peers: Sequence[PeerAddress | str], *,
             round_timeout: float, max_samples_per_second: float, **embedded: Any) -> Awaitable[SwarmLink]:
        """Links to the participant's services when given both local APIs, else to embedded ones
        that `start_embedded` starts (`embedded`: its options); raises ValueError for neither."""
        if (dht_local is None) != (averager_local is None):
            raise ValueError("give both dht_local and averager_local (the participant's services), or neither")
        limits: dict[str, Any] = {"round_timeout": round_timeout, "max_samples_per_second": max_samples_per_second}
        if dht_local is not None and averager_local is not None:
            return cls.connect(run_id, dht_local, averager_local, **limits)
        if start_embedded is None:
            raise ValueError("give dht_local and averager_local (the participant's services), or use "
                             "apiary.Optimizer, which starts embedded ones")
        peers = [p if isinstance(p, PeerAddress) else PeerAddress.parse(p) for p in initial_peers]
        return cls.embedded(run_id, start_embedded(run_id, peers, **embedded), **limits)

    @property
    def dht_address(self) -> str | None:
        """The address others join through (embedded, non-client peers only)."""
        if self.services is not None and not self.client_mode:
            return self.services.dht_address
        return None

    async def publish_progress(self, epoch: int, samples: int, samples_per_second: float) -> bool:
        """Stores this peer's progress record in the DHT."""
        return await self.tracker.publish(epoch, samples, samples_per_second)

    async def fetch_progress(self) -> SwarmProgress:
        """The swarm's progress, from the live records of its peers."""
        return await self.tracker.fetch()

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
        except NotFound as e:
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

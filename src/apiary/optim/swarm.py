"""How a collaborative optimizer reaches its run: the DHT for progress, an averager for rounds.

`SwarmLink.connect()` uses the participant's dht and averager services through their local
APIs (the trainer service's usual case). `SwarmLink.embedded()` starts both services inside
this process first (library use, `apiary up`, tests) and then talks to them the same way, so
there is one code path whatever the deployment.

Rounds and state go through the averager service's local API (`AveragerClient`), which holds
one registered schema at a time: the link re-registers when the optimizer switches between
averaging gradients and averaging its state. `prepare()` has the averager form a round's group
ahead of time, for the schema of the tensors that round will average.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from apiary.averaging.averager import AveragerSettings
from apiary.averaging.local import AveragerClient
from apiary.averaging.partition import Mode
from apiary.averaging.protos.local_pb2 import RoundOutcome
from apiary.dht import DHTSettings
from apiary.dht.local import DHTClient
from apiary.services.averager import AveragerService, AveragerServiceSettings
from apiary.services.dht import DHTService, DHTServiceSettings
from apiary.services.runtime import ServiceSettings
from apiary.wire import ChannelPool, Endpoint, PeerAddress, RequestRejected, WireSettings

logger = logging.getLogger(__name__)


@dataclass
class SwarmLink:
    """The DHT, the averager and this peer's id (the DHT identity that signs its records)."""

    dht: DHTClient
    averager: AveragerClient
    peer_id: str
    client_mode: bool
    pool: ChannelPool
    services: list[Any] = field(default_factory=list)  # started here, stopped by close()
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
    async def embedded(cls, run_id: str, initial_peers: Sequence[PeerAddress | str] = (), *,
                       averaging: dict[str, Any] | None = None, client_mode: bool = False, auxiliary: bool = False,
                       wire: WireSettings | None = None, identity: Path | None = None,
                       announce_period: float = 5.0, round_timeout: float = 300.0) -> SwarmLink:
        """Starts a dht and an averager service in this process (joining `initial_peers`, or a new
        swarm) and links to them. `averaging`: further AveragerSettings fields (codec, group sizes...);
        `auxiliary`: the averager only reduces others' parts (a peer that lends bandwidth, not compute);
        `wire`: their public ports (default: loopback), TLS and private-run credentials; `identity`:
        the identity file both services use (the key an access token is bound to)."""
        peers = [p if isinstance(p, PeerAddress) else PeerAddress.parse(p) for p in initial_peers]
        if client_mode and auxiliary:
            raise ValueError("an auxiliary peer reduces others' parts: it cannot be in client mode")
        mode = Mode.CLIENT if client_mode else Mode.AUX if auxiliary else Mode.NODE
        wire = wire or WireSettings(listen_host="127.0.0.1")
        dht_service = DHTService(wire, ServiceSettings(identity=identity), DHTSettings(client_mode=client_mode),
                                 DHTServiceSettings(initial_peers=peers))
        await dht_service.start()
        services: list[Any] = [dht_service]
        try:
            averager_service = AveragerService(
                wire, ServiceSettings(identity=identity), AveragerSettings(prefix=run_id, mode=mode, **(averaging or {})),
                AveragerServiceSettings(dht_local=dht_service.local_endpoint, announce_period=announce_period),
            )
            await averager_service.start()
            services.append(averager_service)
            link = await cls.connect(dht_service.local_endpoint, averager_service.local_endpoint,
                                     round_timeout=round_timeout)
        except BaseException:
            for service in reversed(services):
                await service.host.shutdown()
            raise
        link.services = services
        return link

    @property
    def dht_address(self) -> str | None:
        """The address others join through (embedded, non-client peers only)."""
        if self.services and self.services[0].node is not None and not self.client_mode:
            return self.services[0].node.address
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
    def last_outcome(self) -> RoundOutcome | None:
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
        for service in reversed(self.services):
            await service.host.shutdown()

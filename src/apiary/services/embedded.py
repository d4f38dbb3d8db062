"""A participant's dht and averager services started inside one process, for the optimizer.

`apiary.Optimizer` is the collaborative optimizer (`apiary.optim.Optimizer`) with `start_embedded`
as its way to start these services when it is not given the participant's running ones (library
use, `apiary up`, tests). The optimizer then talks to them through their local APIs, as it talks
to deployed services, so there is one code path whatever the deployment.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apiary.averaging.averager import AveragerSettings
from apiary.averaging.spans import Role
from apiary.dht import DHTSettings
from apiary.optim import Optimizer as _Optimizer
from apiary.services.averager import AveragerService, AveragerServiceSettings
from apiary.services.dht import DHTService, DHTServiceSettings
from apiary.services.host import ServiceSettings
from apiary.services.reachability import ReachabilitySettings
from apiary.wire import Endpoint, PeerAddress, WireSettings


@dataclass
class EmbeddedServices:
    """The dht and averager services running in this process; `close()` stops both."""

    dht: DHTService
    averager: AveragerService

    @property
    def dht_local(self) -> Endpoint:
        return self.dht.local_endpoint

    @property
    def averager_local(self) -> Endpoint:
        return self.averager.local_endpoint

    @property
    def dht_address(self) -> str | None:
        """The address others join through (None in client mode)."""
        return self.dht.node.address if self.dht.node is not None else None

    async def close(self) -> None:
        await self.averager.host.shutdown()
        await self.dht.host.shutdown()


async def start_embedded(run_id: str, initial_peers: Sequence[PeerAddress], *, averaging: dict[str, Any] | None = None,
                         client_mode: bool = False, auxiliary: bool = False, wire: WireSettings | None = None,
                         identity: Path | None = None, announce_period: float = 5.0,
                         reachability: ReachabilitySettings | None = None) -> EmbeddedServices:
    """Starts a dht and an averager service for run `run_id` (joining `initial_peers`, or a new
    swarm). `averaging`: further AveragerSettings fields (codec, group sizes...); `auxiliary`: the
    averager only reduces others' parts (a peer that lends bandwidth, not compute); `wire`: their
    public ports (default: loopback), TLS and private-run credentials; `identity`: the identity
    file both services use (the key an access token is bound to); `reachability`: how they make
    themselves reachable (default: auto); a relay (`wire.relay`) is offered by the dht service only."""
    if client_mode and auxiliary:
        raise ValueError("an auxiliary peer reduces others' parts: it cannot be in client mode")
    role = Role.CLIENT if client_mode else Role.AUX if auxiliary else Role.NODE
    wire = wire or WireSettings(listen_host="127.0.0.1")
    service = ServiceSettings(identity=identity, reachability=reachability or ReachabilitySettings())
    dht = DHTService(wire, service, DHTSettings(client_mode=client_mode),
                     DHTServiceSettings(initial_peers=list(initial_peers)))
    await dht.start()
    try:
        averager = AveragerService(
            wire.model_copy(update={"relay": False}), service, AveragerSettings(prefix=run_id, mode=role, **(averaging or {})),
            AveragerServiceSettings(dht_local=dht.local_endpoint, announce_period=announce_period),
        )
        await averager.start()
    except BaseException:
        await dht.host.shutdown()
        raise
    return EmbeddedServices(dht, averager)


class Optimizer(_Optimizer):
    """The collaborative optimizer, which starts embedded dht and averager services when it is not
    given the participant's (`dht_local`, `averager_local`); see `apiary.optim.Optimizer`."""

    start_embedded = staticmethod(start_embedded)


def reaching(reachability: ReachabilitySettings) -> type[Optimizer]:
    """`Optimizer` whose embedded services make themselves reachable as `reachability` says."""
    return type("Optimizer", (Optimizer,), {"start_embedded": staticmethod(
        functools.partial(start_embedded, reachability=reachability))})

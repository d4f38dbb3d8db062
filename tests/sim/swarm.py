"""Real DHT nodes (`apiary.dht.DHTNode`, unchanged) on a simulated network in virtual time: the
swarm's hosts, their joins and crashes, and what lookups cost.

Identities come from the swarm's seed, so a node's id, the nodes nearest a key and every
random draw replay exactly. `verify=False` gives nodes a validator that signs records as the
real one does (same bytes on the wire) but trusts them when read: verifying signatures is the
CPU cost of a simulated swarm of thousands, not a network cost.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from apiary.dht import DHTNode, DHTSettings
from apiary.dht.storage import MemoryStorage
from apiary.dht.validation import DHTRecord, SignatureValidator
from apiary.wire import Identity, PeerAddress

from tests.sim.loop import clock
from tests.sim.network import Host, Network


class Unverified(SignatureValidator):
    """Signs as the real validator does; trusts what it reads."""

    def validate(self, record: DHTRecord) -> bool:
        return True


def identities(seed: int, count: int) -> list[Identity]:
    """`count` identities drawn from `seed` (the same in a simulation and on real sockets)."""
    rng = random.Random(seed)
    return [Identity(Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))) for _ in range(count)]


@dataclass
class Member:
    node: DHTNode
    host: Host

    @property
    def address(self) -> PeerAddress:
        return PeerAddress(self.host.endpoint, self.node.identity.peer_id)


class Swarm:
    """Nodes that serve (`members`, the ones others join through) and client-mode nodes behind
    NAT (`clients`: they get and store, and nobody can call them)."""

    def __init__(self, network: Network, seed: int, settings: DHTSettings | None = None, *, verify: bool = True):
        self.network = network
        self.rng = random.Random(seed)
        self.seed = seed
        self.settings = settings or DHTSettings()
        self.verify = verify
        self.members: list[Member] = []
        self.crashed: list[Member] = []
        self.clients: list[Member] = []
        self._made = 0

    async def add(self, identity: Identity | None = None, bootstrap: list[Member] | None = None, *,
                  client: bool = False) -> Member:
        """A node that joins through `bootstrap` (default: up to three random live members); with
        `client`, a client-mode node (it serves nothing)."""
        if identity is None:
            identity = identities(self.seed * 1_000_003 + self._made, 1)[0]
        self._made += 1
        host = self.network.host()
        settings = self.settings.model_copy(update={"client_mode": True}) if client else self.settings
        node = DHTNode(identity, settings, storage=MemoryStorage(clock()), pool=self.network.pool(),
                       validator=None if self.verify else Unverified(identity),
                       transport=self.network.transport(host), clock=clock())
        if not client:
            node.attach(self.network.server(host))
        if bootstrap is None:
            bootstrap = self.rng.sample(self.members, min(3, len(self.members)))
        member = Member(node, host)
        (self.clients if client else self.members).append(member)
        await node.join([b.address for b in bootstrap])
        return member

    async def grow(self, count: int, *, batch: int = 64, given: list[Identity] | None = None) -> None:
        """Adds `count` nodes, `batch` joining at a time."""
        given = list(given or [])
        if not self.members:
            await self.add(given.pop(0) if given else None, bootstrap=[])
            count -= 1
        while count > 0:
            size = min(batch, count)
            await asyncio.gather(*(self.add(given.pop(0) if given else None) for _ in range(size)))
            count -= size

    async def crash(self, share: float) -> list[Member]:
        """Crashes `share` of the live members at random (they answer nothing from now on)."""
        victims = self.rng.sample(self.members, round(share * len(self.members)))
        for member in victims:
            member.host.up = False
            self.members.remove(member)
            self.crashed.append(member)
            await member.node.shutdown()
        return victims

    async def close(self) -> None:
        await asyncio.gather(*(member.node.shutdown() for member in self.members + self.clients))
        self.members.clear()
        self.clients.clear()


async def lookups(swarm: Swarm, pairs: list[tuple[Member, Any, Any]]) -> dict[str, Any]:
    """Each (member, key, value expected): a get by that member. Success, Find RPCs per get
    (the lookup's messages), hops per get (its rounds of Finds: the distinct moments its Finds
    left) and virtual seconds per get."""
    found, finds, hops, seconds = 0, [], [], []
    loop, network = asyncio.get_running_loop(), swarm.network
    for member, key, expected in pairs:
        network.traced, network.starts = member.host.endpoint, []
        started = loop.time()
        result = await member.node.get(key)
        seconds.append(loop.time() - started)
        finds.append(len(network.starts))
        hops.append(len(set(network.starts)))
        found += result is not None and result.value == expected
    network.traced = None
    return {"success": found / len(pairs), "finds_per_get": sum(finds) / len(finds),
            "hops_per_get": sum(hops) / len(hops), "max_hops": max(hops),
            "seconds_per_get": sum(seconds) / len(seconds)}

"""Choosing which experts of a pattern to host: names nobody declares in the DHT now.

`claim_free_experts` picks `count` names at random among the candidates no server declares,
stores each under our address (a claim that lives as long as a declaration), waits `settle`
seconds for servers that chose at the same moment, and reads the names back: a name whose
newest value is another server's was lost to it, and another free name is tried in its place
(one the DHT did not keep may be tried again). Names still declared at our own address (ours
before a restart: same identity, same address) are ours again, taken first, so a restarted
server resumes its experts' checkpoints instead of finding every name taken.
So several servers started with the same pattern spread over it instead of hosting the same
experts.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence

from apiary.dht.interface import DHTLike
from apiary.moe.declaration import find_experts

CLAIM_ROUNDS = 5


class NoFreeExperts(ValueError):
    """The pattern has fewer free names than the server is asked to host."""


async def claim_free_experts(dht: DHTLike, candidates: Sequence[str], count: int, address: str, ttl: float, *,
                             settle: float = 1.0, rng: random.Random | None = None) -> list[str]:
    """`count` names of `candidates` that no other server declares, claimed for `address` (in
    the candidates' order). Raises NoFreeExperts when too few are free."""
    if not 0 < count <= len(candidates):
        raise NoFreeExperts(f"cannot host {count} of the {len(candidates)} experts the pattern names")
    rng = rng or random.Random()
    owned: list[str] = []
    lost: set[str] = set()
    for _ in range(CLAIM_ROUNDS):
        declared = await find_experts(dht, candidates)
        wanted = count - len(owned)
        ours = [name for name in candidates if declared[name] == address and name not in owned][:wanted]
        free = [name for name in candidates if declared[name] is None and name not in lost]
        if len(ours) + len(free) < wanted:
            raise NoFreeExperts(f"{count} experts asked, but only {len(owned) + len(ours) + len(free)} of the "
                                f"{len(candidates)} the pattern names are free (others are declared by other servers)")
        picked = ours + rng.sample(free, wanted - len(ours))
        expiration = time.time() + ttl
        await dht.store_many([(name, None, address, expiration) for name in picked])
        await asyncio.sleep(settle)
        holders = await find_experts(dht, picked)
        owned += [name for name in picked if holders[name] == address]
        lost.update(name for name in picked if holders[name] not in (None, address))  # None: tried again
        if len(owned) == count:
            order = {name: index for index, name in enumerate(candidates)}
            return sorted(owned, key=order.__getitem__)
    raise NoFreeExperts(f"could not claim {count} free experts in {CLAIM_ROUNDS} rounds: other servers "
                        f"kept taking the same names")

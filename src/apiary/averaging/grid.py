"""Moshpit group keys: peers on a virtual grid average along one dimension per round.

A peer holds `dims` coordinates in [0, side). In round r it looks for a group among the peers
whose coordinates equal its own except along dimension r mod dims; after the round it sets
that coordinate to its position in the group. Peers that start at random coordinates settle
into a grid, and with groups of `side` peers on a full grid every peer holds the global mean
after `dims` rounds.
"""

from __future__ import annotations

import math
import random


class MoshpitGrid:
    def __init__(self, dims: int, side: int, rng: random.Random | None = None):
        if dims < 1 or side < 1:
            raise ValueError(f"a grid needs dims >= 1 and side >= 1, got dims={dims}, side={side}")
        self.dims, self.side = dims, side
        self.coords = [(rng or random).randrange(side) for _ in range(dims)]

    @classmethod
    def for_swarm(cls, expected_peers: int, group_size: int) -> MoshpitGrid:
        """A grid with groups of `group_size` over about `expected_peers` peers."""
        if group_size >= expected_peers:
            return cls(1, 1)
        return cls(max(1, math.ceil(math.log(expected_peers) / math.log(group_size))), group_size)

    def key(self, round_index: int) -> str:
        axis = round_index % self.dims
        return ".".join("*" if i == axis else str(c) for i, c in enumerate(self.coords))

    def settle(self, round_index: int, position: int) -> None:
        """After a round: our coordinate along its axis becomes our position in the group."""
        self.coords[round_index % self.dims] = position % self.side

"""Moshpit group keys: peers on a virtual grid average along one dimension per round.

A peer holds `dims` coordinates in [0, side). Its first round looks at the whole swarm and
places every peer by its rank in peer-id order (see `settle_at`). In round r it looks for a group among the peers
whose coordinates equal its own except along dimension r mod dims; after the round it sets
that coordinate to its position in the group. Peers that start at random coordinates tend to
settle into a grid, and with groups of `side` peers on a full grid every peer holds the global
mean after `dims` rounds. A peer that finds no group in a round steps aside along that round's
axis, so that a grid with duplicated and empty cells still mixes everyone.
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
        self.settled = False  # until the first round places us by rank

    @classmethod
    def for_swarm(cls, expected_peers: int, group_size: int) -> MoshpitGrid:
        """A grid with groups of `group_size` over about `expected_peers` peers."""
        if group_size >= expected_peers:
            return cls(1, 1)
        return cls(max(1, math.ceil(math.log(expected_peers) / math.log(group_size))), group_size)

    def key(self, round_index: int) -> str:
        """The group key of a round: every coordinate but the round's axis (all wildcards until
        settled, so that the first round sees the whole swarm)."""
        axis = round_index % self.dims
        return ".".join("*" if i == axis or not self.settled else str(c) for i, c in enumerate(self.coords))

    def digits(self, rank: int) -> list[int]:
        """The coordinates of the `rank`-th peer of a full grid (axis 0 varies fastest)."""
        return [(rank // self.side**axis) % self.side for axis in range(self.dims)]

    def line_of(self, round_index: int, rank: int) -> tuple[int, ...]:
        """Which line along the round's axis the `rank`-th peer lies on."""
        axis = round_index % self.dims
        return tuple(d for i, d in enumerate(self.digits(rank)) if i != axis)

    def settle_at(self, rank: int) -> None:
        """Takes the coordinates of our rank among all the peers the first round saw: on a full
        grid, peers then average along one axis per round and all hold the global mean after
        `dims` rounds, instead of only approaching it from random coordinates."""
        self.coords = self.digits(rank)
        self.settled = True

    def settle(self, round_index: int, position: int) -> None:
        """After a round: our coordinate along its axis becomes our position in the group."""
        self.coords[round_index % self.dims] = position % self.side

    def step_aside(self, round_index: int) -> None:
        """After a round that found no group: move one step along its axis. A peer left out of
        its line (alone there, or the odd one out when the line is cut into groups) would find the
        same lines, and be left out of them, in every later round, never averaging with anyone."""
        axis = round_index % self.dims
        self.coords[axis] = (self.coords[axis] + 1) % self.side

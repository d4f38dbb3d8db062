"""Moshpit group keys: peers on a virtual grid average along one dimension per round.

A peer holds `dims` coordinates in [0, side). In round r it looks for a group among the peers
whose coordinates equal its own except along dimension r mod dims (its *line*); with one peer
in every cell and groups of `side`, every peer holds the global mean after `dims` rounds.

Places are kept, not reshuffled: after a round a peer keeps its coordinate along the round's
axis unless a peer of its line holds the same one, and then takes a free one of that line
(`claim_places`). A line missing a peer (absent this round, or gone) therefore leaves everyone
else in place, and the absent peer finds its place again when it comes back.

Where a peer starts: in round 0 (the swarm's first) it looks at the whole swarm and takes the
place of its rank in peer-id order (`settle_at`), which fills the grid exactly. A peer whose
first round comes later (it missed round 0, or joins a running swarm) probes a few lines of the
established grid, joins the least crowded one (`lines`) and claims a free place there. A peer
that finds no one to average with steps aside along that round's axis, so that sparse lines
still meet the others.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping


class MoshpitGrid:
    def __init__(self, dims: int, side: int, rng: random.Random | None = None):
        if dims < 1 or side < 1:
            raise ValueError(f"a grid needs dims >= 1 and side >= 1, got dims={dims}, side={side}")
        self.dims, self.side = dims, side
        self.coords = [(rng or random).randrange(side) for _ in range(dims)]
        self.settled = False  # until our first round gives us a place (until then, a random start)

    @classmethod
    def for_swarm(cls, expected_peers: int, group_size: int) -> MoshpitGrid:
        """A grid with groups of `group_size` over about `expected_peers` peers."""
        if group_size >= expected_peers:
            return cls(1, 1)
        return cls(max(1, math.ceil(math.log(expected_peers) / math.log(group_size))), group_size)

    def ranks_in(self, round_index: int) -> bool:
        """Whether this round places us by our rank among the whole swarm: only the swarm's first
        round, and only while we have no place. Later, the others are on the grid already, and a
        newcomer joins them on a line instead of meeting only the other newcomers."""
        return round_index == 0 and not self.settled

    def key(self, round_index: int, coords: list[int] | None = None) -> str:
        """The group key of a round: every coordinate (ours, or `coords`) but the round's axis
        (all wildcards in a round that places us by rank, so that it sees the whole swarm)."""
        axis = round_index % self.dims
        ranking = self.ranks_in(round_index)
        coords = self.coords if coords is None else coords
        return ".".join("*" if i == axis or ranking else str(c) for i, c in enumerate(coords))

    def lines(self, round_index: int, count: int, rng: random.Random | None = None) -> list[list[int]]:
        """Up to `count` distinct random lines along the round's axis, each as coordinates (ours
        on the axis): the lines a newcomer probes to join the least crowded one."""
        axis = round_index % self.dims
        total = self.side ** (self.dims - 1)
        picks = (rng or random).sample(range(total), min(count, total))
        others = [[(pick // self.side**i) % self.side for i in range(self.dims - 1)] for pick in picks]
        return [digits[:axis] + [self.coords[axis]] + digits[axis:] for digits in others]

    def place(self, round_index: int) -> int | None:
        """Our coordinate along the round's axis, to announce to our line (None: no place yet)."""
        return self.coords[round_index % self.dims] if self.settled else None

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

    def settle_line(self, round_index: int, places: Mapping[str, int | None], me: str) -> None:
        """After a round: takes our place along its axis among the places our line announced
        (`claim_places`); a newcomer without a free place keeps its random coordinate."""
        axis = round_index % self.dims
        claimed = claim_places(places, self.side).get(me)
        if claimed is not None:
            self.coords[axis] = claimed
        self.settled = True

    def step_aside(self, round_index: int) -> None:
        """After a round that found no one to average with: move one step along its axis. A peer
        alone on its line, or the odd one out when the line is cut into groups, would find the same
        lines, and be left out of them, in every later round, never averaging with anyone."""
        axis = round_index % self.dims
        self.coords[axis] = (self.coords[axis] + 1) % self.side


def claim_places(places: Mapping[str, int | None], side: int) -> dict[str, int | None]:
    """Distinct places along one axis for the peers of one line, given the places they announced
    (None: none yet). In peer-id order, a peer keeps its place unless an earlier peer holds it;
    peers left without a place take the free ones, lowest first, in peer-id order, and keep
    their announced place (or None) when the line is full. Every peer of the line computes the
    same answer from the same announcements."""
    claimed: dict[str, int | None] = {}
    taken: set[int] = set()
    for peer in sorted(places):
        place = places[peer]
        if place is not None and 0 <= place < side and place not in taken:
            claimed[peer] = place
            taken.add(place)
    free = iter(sorted(set(range(side)) - taken))
    for peer in sorted(set(places) - set(claimed)):
        claimed[peer] = next(free, places[peer])
    return claimed

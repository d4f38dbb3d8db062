"""Finding the best live experts for each sample with a beam search over the DHT.

A gating network scores every coordinate of every grid dimension; an expert's score is the
sum of the scores of its coordinates. The search walks the grid one dimension at a time: at
each level it reads, for every prefix still in some sample's beam, which next coordinates have
live experts (one DHT lookup for all prefixes of the level, `next_coordinates_many`), extends
each sample's beam with them and keeps the `beam_size` best. A level looks up at most
`max_lookups` prefixes (default: `beam_size`) however large the batch and popular the grid:
each sample's best prefix first, those of more samples before others (`_bounded`), then each
sample's second best, and so on; prefixes left out drop out of their beams (a sample left
with none extends the prefixes read, by its own scores). Only declared (live) experts are
ever considered, so a dead server's experts drop out once their declarations expire; those of
a server the caller has banned (`apiary.moe.bans`) are skipped at once. With a `timeout`, each
level's lookup gets its share of the time left and the search goes on with what it found.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from apiary.dht.interface import DHTLike
from apiary.moe.declaration import next_coordinates_many


@dataclass(frozen=True)
class ExpertChoice:
    """An expert chosen for a sample: its name, the address of its server, its coordinates."""

    name: str
    address: str
    coordinates: tuple[int, ...]


async def beam_search(dht: DHTLike, prefix: str, grid_scores: Sequence[torch.Tensor], k_best: int,
                      beam_size: int | None = None, *, timeout: float | None = None,
                      banned: Callable[[str], bool] | None = None,
                      max_lookups: int | None = None) -> list[list[ExpertChoice]]:
    """Up to `k_best` live experts per sample, best first. `grid_scores[d]` is [batch, size of
    dimension d]; `prefix` is the grid's name (`"ffn"` for experts `ffn.i.j`). `timeout`: the
    search's seconds; `banned(address)`: servers to skip; `max_lookups`: DHT keys read per
    level at most (default `beam_size`)."""
    if k_best < 1:
        raise ValueError(f"k_best must be at least 1, got {k_best}")
    beam_size = max(beam_size or k_best, k_best)
    check_search_bounds(k_best, None, max_lookups)
    max_lookups = beam_size if max_lookups is None else max_lookups
    scores = [s.detach().float().cpu().tolist() for s in grid_scores]
    batch = len(scores[0]) if scores else 0
    beams: list[list[tuple[float, tuple[int, ...]]]] = [[(0.0, ())] for _ in range(batch)]
    last = len(scores) - 1
    chosen: list[list[ExpertChoice]] = [[] for _ in range(batch)]
    deadline = None if timeout is None else time.monotonic() + timeout
    for depth, level in enumerate(scores):
        keys = {coordinates: _key(prefix, coordinates) for coordinates in _bounded(beams, max_lookups)}
        share = None if deadline is None else max(0.0, deadline - time.monotonic()) / (len(scores) - depth)
        found = await next_coordinates_many(dht, list(keys.values()), timeout=share)
        if depth == last and banned is not None:
            found = {key: {c: entry for c, entry in entries.items() if not banned(entry[1])}
                     for key, entries in found.items()}
        for sample, beam in enumerate(beams):
            candidates = []
            looked_up = [(score, coordinates) for score, coordinates in beam if coordinates in keys]
            if not looked_up:  # the sample's whole beam was left out: it extends the prefixes read instead
                looked_up = [(sum(scores[d][sample][c] for d, c in enumerate(coordinates)), coordinates)
                             for coordinates in keys]
            for score, coordinates in looked_up:
                for coordinate, (name, address) in found[keys[coordinates]].items():
                    if 0 <= coordinate < len(level[sample]):
                        candidates.append((score + level[sample][coordinate], coordinates + (coordinate,), name, address))
            candidates.sort(key=lambda c: -c[0])
            if depth == last:
                chosen[sample] = [ExpertChoice(name, address, coordinates)
                                  for _, coordinates, name, address in candidates[:k_best]]
            else:
                beams[sample] = [(score, coordinates) for score, coordinates, _, _ in candidates[:beam_size]]
    return chosen


def check_search_bounds(k_best: int, beam_size: int | None, max_lookups: int | None) -> None:
    """ValueError naming the bound that is wrong: `beam_size` must be None or an integer of at
    least `k_best`, `max_lookups` None or an integer of at least 1."""
    for name, value, least, said in (("beam_size", beam_size, k_best, f"k_best ({k_best})"),
                                     ("max_lookups", max_lookups, 1, "1")):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise ValueError(f"{name} must be None (the default) or an integer of at least {said}, got {value!r}")


def _bounded(beams: list[list[tuple[float, tuple[int, ...]]]], count: int) -> list[tuple[int, ...]]:
    """At most `count` prefixes of the beams to look up: by their best place in any sample's
    beam (beams are sorted best first), then by how many samples' beams hold them."""
    place: dict[tuple[int, ...], int] = {}
    holders: dict[tuple[int, ...], int] = {}
    for beam in beams:
        for position, (_, coordinates) in enumerate(beam):
            place[coordinates] = min(place.get(coordinates, position), position)
            holders[coordinates] = holders.get(coordinates, 0) + 1
    return sorted(place, key=lambda c: (place[c], -holders[c], c))[:count]


def _key(prefix: str, coordinates: tuple[int, ...]) -> str:
    return ".".join([prefix, *map(str, coordinates)]) + "."

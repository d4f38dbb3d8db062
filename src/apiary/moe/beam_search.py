"""Finding the best live experts for each sample with a beam search over the DHT.

A gating network scores every coordinate of every grid dimension; an expert's score is the
sum of the scores of its coordinates. The search walks the grid one dimension at a time: at
each level it reads, for every prefix still in some sample's beam, which next coordinates have
live experts (one DHT lookup for all prefixes of the level, `next_coordinates_many`), extends
each sample's beam with them and keeps the `beam_size` best. Only declared (live) experts are
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
                      banned: Callable[[str], bool] | None = None) -> list[list[ExpertChoice]]:
    """Up to `k_best` live experts per sample, best first. `grid_scores[d]` is [batch, size of
    dimension d]; `prefix` is the grid's name (`"ffn"` for experts `ffn.i.j`). `timeout`: the
    search's seconds; `banned(address)`: servers to skip."""
    if k_best < 1:
        raise ValueError(f"k_best must be at least 1, got {k_best}")
    beam_size = max(beam_size or k_best, k_best)
    scores = [s.detach().float().cpu().tolist() for s in grid_scores]
    batch = len(scores[0]) if scores else 0
    beams: list[list[tuple[float, tuple[int, ...]]]] = [[(0.0, ())] for _ in range(batch)]
    last = len(scores) - 1
    chosen: list[list[ExpertChoice]] = [[] for _ in range(batch)]
    deadline = None if timeout is None else time.monotonic() + timeout
    for depth, level in enumerate(scores):
        keys = {coordinates: _key(prefix, coordinates) for beam in beams for _, coordinates in beam}
        share = None if deadline is None else max(0.0, deadline - time.monotonic()) / (len(scores) - depth)
        found = await next_coordinates_many(dht, list(keys.values()), timeout=share)
        if depth == last and banned is not None:
            found = {key: {c: entry for c, entry in entries.items() if not banned(entry[1])}
                     for key, entries in found.items()}
        for sample, beam in enumerate(beams):
            candidates = []
            for score, coordinates in beam:
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


def _key(prefix: str, coordinates: tuple[int, ...]) -> str:
    return ".".join([prefix, *map(str, coordinates)]) + "."

"""Torch-free readers of the records the `optim` and `moe` layers write: training progress
(`apiary.optim.progress`) and expert declarations (`apiary.moe.declaration`).

The monitor runs in the dht service's image, which has no torch, and importing any module of
those packages imports torch (their `__init__`), so it reads their formats here;
tests/test_monitor_readers.py checks these readers against the writers, so they cannot drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from apiary.dht.interface import DHTLike


def progress_key(run_id: str) -> str:
    """As `apiary.optim.progress.progress_key`."""
    return f"{run_id}.progress"


@dataclass(frozen=True)
class Progress:
    """One peer's progress record (`apiary.optim.progress.PeerProgress`)."""

    peer_id: str
    epoch: int
    samples: int
    samples_per_second: float
    reported_at: float
    client: bool

    @classmethod
    def from_value(cls, peer_id: str, value: Any) -> Progress | None:
        try:
            record = cls(peer_id, int(value["epoch"]), int(value["samples"]), float(value["sps"]),
                         float(value["time"]), bool(value.get("client", False)))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        if record.epoch < 0 or record.samples < 0 or not math.isfinite(record.samples_per_second) \
                or record.samples_per_second < 0:
            return None
        return record


def read_progress(found: Any) -> list[Progress]:
    """The valid records of a `<run>.progress` lookup, by peer id."""
    records = []
    for subkey, item in (found.value.items() if found is not None and isinstance(found.value, dict) else ()):
        if isinstance(subkey, str) and subkey.startswith("[owner:") and subkey.endswith("]"):
            record = Progress.from_value(subkey[len("[owner:"):-1], getattr(item, "value", None))
            if record is not None:
                records.append(record)
    return sorted(records, key=lambda r: r.peer_id)


def swarm_epoch(records: list[Progress]) -> int:
    """The run's epoch as a peer that is not training sees it (`ProgressTracker.fetch`): the newest
    epoch two peers report (the newest one reported, in a swarm of one or two)."""
    epochs = sorted((r.epoch for r in records), reverse=True)
    if not epochs:
        return 0
    return epochs[1] if len(epochs) > 2 else epochs[0]


def grid_coordinates(name: str) -> tuple[str, list[int]] | None:
    """`"ffn.0.3"` -> (`"ffn"`, [0, 3]); None for a name not on a grid (`apiary.moe.declaration`)."""
    prefix, *rest = name.split(".")
    if not prefix or not rest or not all(part.isdigit() for part in rest):
        return None
    return prefix, [int(part) for part in rest]


async def find_experts(dht: DHTLike, names: list[str], *, timeout: float | None = None) -> dict[str, str | None]:
    """The address declaring each expert now, or None (`apiary.moe.declaration.find_experts`)."""
    found = await dht.get_many(list(names), latest=True, timeout=timeout) if names else []
    return {name: (item.value if item is not None and isinstance(item.value, str) else None)
            for name, item in zip(names, found)}

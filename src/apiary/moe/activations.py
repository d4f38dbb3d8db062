"""Activations a forward pass keeps for the backward pass of the same inputs.

Without them, a Backward request recomputes the expert's forward pass (a third more compute
for a feed-forward expert). A Forward asked to keep them runs with grad and leaves its graph
here under a random handle; the Backward that brings the handle back uses the graph when it
is still exact: the same inputs, and no optimizer step of the expert in between (a step
changes the weights the graph holds). Otherwise it recomputes, so the result is the same
either way. Bounded: at most `max_entries` graphs, none older than `ttl` seconds.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass
class KeptActivations:
    """One forward pass with grad: its inputs (the float ones as leaves), its outputs, and the
    expert's update count then."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    updates: int
    kept_at: float = field(default_factory=time.monotonic)


class ActivationCache:
    """Thread-safe store of kept activations by (expert, handle), oldest evicted first."""

    def __init__(self, max_entries: int = 64, ttl: float = 30.0):
        if max_entries < 0:
            raise ValueError(f"max_entries must be non-negative, got {max_entries}")
        if not ttl > 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        self.max_entries = max_entries
        self.ttl = ttl
        self._entries: OrderedDict[tuple[str, bytes], KeptActivations] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def new_handle() -> bytes:
        return os.urandom(16)

    def put(self, expert: str, handle: bytes, kept: KeptActivations) -> None:
        with self._lock:
            self._entries[expert, handle] = kept
            self._evict(time.monotonic())

    def pop(self, expert: str, handle: bytes) -> KeptActivations | None:
        """The activations kept under `handle` (removed: a graph serves one backward), or None."""
        with self._lock:
            self._evict(time.monotonic())
            return self._entries.pop((expert, handle), None)

    def _evict(self, now: float) -> None:
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if len(self._entries) <= self.max_entries and now - oldest.kept_at <= self.ttl:
                break
            self._entries.popitem(last=False)

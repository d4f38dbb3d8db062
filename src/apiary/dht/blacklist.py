"""Peers that failed to answer, avoided for a time that doubles with each further failure."""

from __future__ import annotations

from apiary.clock import REAL, Clock


class Blacklist:
    def __init__(self, base_seconds: float = 5.0, max_seconds: float = 300.0, clock: Clock = REAL):
        self.clock = clock
        self.base_seconds = base_seconds
        self.max_seconds = max_seconds
        self._failures: dict[str, int] = {}
        self._banned_until: dict[str, float] = {}

    def failed(self, peer_id: str) -> None:
        self._forget_old()
        count = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = count
        ban = min(self.base_seconds * 2 ** (count - 1), self.max_seconds)
        self._banned_until[peer_id] = self.clock.monotonic() + ban

    def succeeded(self, peer_id: str) -> None:
        self._failures.pop(peer_id, None)
        self._banned_until.pop(peer_id, None)

    def banned(self, peer_id: str) -> bool:
        until = self._banned_until.get(peer_id)
        return until is not None and self.clock.monotonic() < until

    def _forget_old(self) -> None:
        """Drops peers whose last ban ended long ago, so churn does not grow the records forever."""
        cutoff = self.clock.monotonic() - 2 * self.max_seconds
        for peer, until in list(self._banned_until.items()):
            if until < cutoff:
                del self._banned_until[peer]
                self._failures.pop(peer, None)

    def __len__(self) -> int:
        return sum(1 for peer in list(self._banned_until) if self.banned(peer))

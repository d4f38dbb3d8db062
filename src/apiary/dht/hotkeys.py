"""Which keys a node is asked for far more than others (hot keys), to report them.

Each Find of a key adds one to the key's count; counts halve every `half_life` seconds. A key
is hot while its count is at least `factor` times the average count of the keys tracked (and
at least `min_count`). A node keeps answering a hot key (caching along lookup paths takes the
load off it); it only reports how many keys are hot. At most `max_keys` keys are tracked: a new
key past it replaces the one with the lowest count.
"""

from __future__ import annotations

from apiary.clock import REAL, Clock


class HotKeys:
    def __init__(self, factor: float, half_life: float, *, max_keys: int = 1024, min_count: float = 20.0,
                 clock: Clock = REAL):
        self.clock = clock
        self.factor, self.half_life, self.max_keys, self.min_count = factor, half_life, max_keys, min_count
        # counts in units of time `_origin`: a request at time t weighs 2 ** ((t - _origin) / half_life)
        self._counts: dict[bytes, float] = {}
        self._total = 0.0
        self._origin = clock.monotonic()

    def seen(self, key: bytes) -> bool:
        """Counts one request for `key`; whether the key is hot now."""
        weight = self._weight()
        if key not in self._counts and len(self._counts) >= self.max_keys:
            coldest = min(self._counts, key=self._counts.__getitem__)
            self._total -= self._counts.pop(coldest)
        self._counts[key] = self._counts.get(key, 0.0) + weight
        self._total += weight
        return self._is_hot(self._counts[key], weight)

    def hot(self) -> int:
        """How many keys are hot now."""
        weight = self._weight()
        return sum(self._is_hot(count, weight) for count in self._counts.values())

    def _is_hot(self, count: float, weight: float) -> bool:
        average = self._total / len(self._counts)
        return count >= self.factor * average and count >= self.min_count * weight

    def _weight(self) -> float:
        """The weight of a request now; rescales the counts before the weights grow too large."""
        age = (self.clock.monotonic() - self._origin) / self.half_life
        if age > 64:
            scale = 2.0 ** -age
            self._counts = {key: count * scale for key, count in self._counts.items() if count * scale > 1e-3}
            self._total = sum(self._counts.values())
            self._origin = self.clock.monotonic()
            age = 0.0
        return 2.0 ** age

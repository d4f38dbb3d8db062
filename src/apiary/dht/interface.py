"""What the layers above need of a DHT: `DHTNode` (embedded) and `DHTClient` (the participant's
dht service) both provide it, so services work the same against either."""

from __future__ import annotations

from typing import Any, Protocol


class DHTLike(Protocol):
    async def store(self, key: Any, value: Any, expiration: float, subkey: Any = None) -> bool: ...

    async def store_many(self, items: list[tuple[Any, Any, Any, float]]) -> list[bool]: ...

    async def get(self, key: Any, latest: bool = False, *, timeout: float | None = None) -> Any: ...

    async def get_many(self, keys: list[Any], latest: bool = False, *, timeout: float | None = None) -> list[Any]:
        """With `timeout`, the search ends after that many seconds with what it found."""

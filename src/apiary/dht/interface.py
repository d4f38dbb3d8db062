"""What the layers above need of a DHT: `DHTNode` (embedded) and `DHTClient` (the participant's
dht service) both provide it, so services work the same against either."""

from __future__ import annotations

from typing import Any, Protocol


class DHTLike(Protocol):
    async def store(self, key: Any, value: Any, expiration: float, subkey: Any = None) -> bool: ...

    async def store_many(self, items: list[tuple[Any, Any, Any, float]]) -> list[bool]: ...

    async def get(self, key: Any, latest: bool = False) -> Any: ...

    async def get_many(self, keys: list[Any], latest: bool = False) -> list[Any]: ...

"""Declaring experts in the DHT so that trainers can find them, and finding them.

The format of a declaration and the lookups (`grid_coordinates`, `find_experts`,
`next_coordinates`) are `apiary.formats.declarations` (torch-free, for the monitor too; imported
here for this layer's users). Declarations expire; a server re-declares its experts
periodically (`keep_declared`), so the experts of a dead server disappear on their own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from apiary.dht.interface import DHTLike
from apiary.formats.declarations import (
    declaration_items, find_experts, grid_coordinates, next_coordinates, next_coordinates_many,
)

__all__ = ["declaration_items", "declare_experts", "find_experts", "grid_coordinates", "keep_declared",
           "next_coordinates", "next_coordinates_many"]

logger = logging.getLogger(__name__)


async def declare_experts(dht: DHTLike, names: Sequence[str], address: str, ttl: float) -> list[bool]:
    """Declares every expert for `ttl` seconds; returns, per item, whether the DHT took it."""
    return await dht.store_many(declaration_items(names, address, time.time() + ttl))


async def keep_declared(dht: DHTLike, names: Sequence[str], address: str | Callable[[], str], period: float,
                        on_declared: Callable[[], None] | None = None) -> None:
    """Re-declares the experts every `period` seconds (each declaration lives 3 periods) until
    cancelled, at `address` (a function of none: read at each declaration, so a server whose
    announced address changes is declared at the new one). A failed declaration is logged and
    tried again next period; `on_declared` is called after each one the DHT took."""
    while True:
        try:
            stored = await declare_experts(dht, names, address() if callable(address) else address, ttl=3 * period)
        except Exception as e:  # noqa: BLE001 - the DHT may be down for a while; try again next period
            logger.warning("declaring %d experts in the DHT failed: %s", len(names), e)
        else:
            if stored and any(stored) and on_declared is not None:
                on_declared()
        await asyncio.sleep(period)

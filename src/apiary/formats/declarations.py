"""Expert declarations in the DHT: where a trainer (or the monitor) finds the expert servers.

An expert named on a grid, `prefix.i.j`, is stored under its full name (value: the server's
address) and under every proper prefix as a dictionary entry keyed by its next coordinate
(`"prefix."` → {i: ...}, `"prefix.i."` → {j: ...}), so a beam search can walk the grid one
coordinate at a time and see only live experts. Declarations expire; a server re-declares its
experts periodically (`apiary.moe.declaration`), so the experts of a dead server disappear on
their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from apiary.dht.interface import DHTLike


def grid_coordinates(name: str) -> tuple[str, list[int]]:
    """`"ffn.0.3"` → (`"ffn"`, [0, 3]); raises ValueError for a name that is not on a grid."""
    prefix, *rest = name.split(".")
    if not prefix or not rest or not all(part.isdigit() for part in rest):
        raise ValueError(f"expert name {name!r} is not on a grid (expected prefix.i.j..., e.g. ffn.0.3)")
    return prefix, [int(part) for part in rest]


def declaration_items(names: Sequence[str], address: str, expiration: float) -> list[tuple[str, Any, Any, float]]:
    """The DHT items (key, subkey, value, expiration) that declare `names` at `address`."""
    items: dict[tuple[str, Any], tuple[str, Any, Any, float]] = {}
    for name in names:
        prefix, coordinates = grid_coordinates(name)
        items[name, None] = (name, None, address, expiration)
        for depth, coordinate in enumerate(coordinates):
            key = ".".join([prefix, *map(str, coordinates[:depth])]) + "."
            # one entry per coordinate: several experts below it share it (the first one named)
            items.setdefault((key, coordinate), (key, coordinate, [name, address], expiration))
    return list(items.values())


async def find_experts(dht: DHTLike, names: Sequence[str], *, timeout: float | None = None) -> dict[str, str | None]:
    """The address serving each expert, or None for an expert nobody declares now (the lookup
    ends after `timeout` seconds with what it found)."""
    found = await dht.get_many(list(names), latest=True, timeout=timeout) if names else []
    return {name: (item.value if item is not None and isinstance(item.value, str) else None)
            for name, item in zip(names, found)}


async def next_coordinates(dht: DHTLike, prefix: str) -> dict[int, tuple[str, str]]:
    """The live experts one coordinate below `prefix` (e.g. `"ffn.0."`): coordinate → (name, address)."""
    return (await next_coordinates_many(dht, [prefix]))[prefix]


async def next_coordinates_many(dht: DHTLike, prefixes: Sequence[str], *, timeout: float | None = None
                                ) -> dict[str, dict[int, tuple[str, str]]]:
    """`next_coordinates` of several prefixes in one DHT lookup (ending after `timeout` seconds
    with what it found)."""
    unique = list(dict.fromkeys(prefixes))
    found = await dht.get_many(unique, latest=True, timeout=timeout) if unique else []
    return {prefix: _entries(item) for prefix, item in zip(unique, found)}


def _entries(found: Any) -> dict[int, tuple[str, str]]:
    if found is None or not isinstance(found.value, dict):
        return {}
    return {coordinate: (item.value[0], item.value[1]) for coordinate, item in found.value.items()
            if isinstance(coordinate, int) and isinstance(item.value, list) and len(item.value) == 2
            and all(isinstance(part, str) for part in item.value)}

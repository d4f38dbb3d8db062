"""Expert names on a grid, written as patterns: `ffn.0.[0:4]` is ffn.0.0 … ffn.0.3.

A pattern is a prefix then coordinates separated by dots; each coordinate is a number or a
range `[start:stop]` (stop excluded). Several patterns are separated by commas:
`ffn.[0:2].[0:4],ffn.2.0` names 9 experts.
"""

from __future__ import annotations

import itertools
import math
import re

from apiary.moe.declaration import grid_coordinates

MAX_EXPERTS = 65536
_RANGE = re.compile(r"^\[(\d+):(\d+)\]$")


def expand_expert_names(patterns: str) -> list[str]:
    """The expert names that comma-separated `patterns` describe, in order. Raises ValueError
    naming the faulty pattern (not on a grid, an empty range, a name given twice, too many)."""
    names: list[str] = []
    for pattern in (p.strip() for p in patterns.split(",")):
        if not pattern:
            continue
        prefix, *parts = pattern.split(".")
        choices = []
        for part in parts:
            if match := _RANGE.match(part):
                start, stop = int(match.group(1)), int(match.group(2))
                if start >= stop:
                    raise ValueError(f"expert pattern {pattern!r}: range {part} is empty")
                choices.append([str(i) for i in range(start, stop)])
            else:
                choices.append([part])
        if len(names) + math.prod(len(c) for c in choices) > MAX_EXPERTS:
            raise ValueError(f"expert patterns {patterns!r} name more than {MAX_EXPERTS} experts")
        for coordinates in itertools.product(*choices):
            name = ".".join([prefix, *coordinates])
            try:
                grid_coordinates(name)
            except ValueError as e:
                raise ValueError(f"expert pattern {pattern!r}: {e}") from None
            names.append(name)
    if not names:
        raise ValueError(f"expert patterns {patterns!r} name no expert (e.g. ffn.0.[0:4])")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"expert patterns {patterns!r} name {name!r} twice")
        seen.add(name)
    return names


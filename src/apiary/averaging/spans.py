"""How a group splits the flattened tensors into spans, one per reducer, by bandwidth.

Each reducer receives its span from every other sender and sends the mean back, so a peer
with share s of N elements moves about N * (1 - s) out and N * s * (senders - 1) * 2 through
its link. The shares minimise the slowest peer's time under the declared bandwidths. Of the
many shares that do when a slow peer alone sets the round's time, the balanced ones are taken:
every reducer with a share finishes at the same time, as early as possible (water-filling), so
more bandwidth never means a smaller share. Groups where reducing more makes a peer faster (a
single sender that also reduces) are solved as a small linear program with scipy's HiGHS.
A member's `Role` says what it does in a group: client peers (who cannot be dialled) reduce
nothing; aux peers reduce but send no data of their own; node peers do both.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
from scipy.optimize import linprog


class Role(str, Enum):
    """What a member does in a group (`AveragerSettings.mode`, the `--mode` flag of `apiary averager`)."""

    NODE = "node"  # sends its tensors and reduces a span
    CLIENT = "client"  # sends only (behind NAT)
    AUX = "aux"  # reduces only, contributes no tensors (weight 0)


@dataclass(frozen=True)
class Member:
    """A group member as every member sees it."""

    peer_id: str
    bulk_address: str  # host:port of its bulk transport ("" for clients)
    role: Role
    bandwidth: float  # declared, in bytes per second (any consistent unit)

    @property
    def sends(self) -> bool:
        return self.role is not Role.AUX

    @property
    def reduces(self) -> bool:
        return self.role is not Role.CLIENT


def shares(members: list[Member]) -> list[float]:
    """The fraction of the elements each member reduces (0 for clients); sums to 1."""
    reducers = [i for i, m in enumerate(members) if m.reduces]
    if not reducers:
        raise ValueError("a group needs at least one member that reduces (node or aux role)")
    senders = sum(m.sends for m in members)
    count = len(members)
    # member i's time is (slopes[i] * share_i + owns[i]) / bandwidth_i (the traffic model below)
    owns = [1 if m.sends else 0 for m in members]
    slopes = [2 * (senders - own) - own for own in owns]
    if all(slopes[i] > 0 for i in reducers):
        return _balanced(reducers, slopes, owns, [max(m.bandwidth, 1e-9) for m in members])
    # variables: share_0..share_{n-1}, T; minimise T
    cost = np.zeros(count + 1)
    cost[-1] = 1.0
    rows, bounds_b = [], []
    for i, member in enumerate(members):
        bandwidth = max(member.bandwidth, 1e-9)
        # traffic of member i per element of the whole vector, as a linear function of its share:
        # sends (1 - s_i) if it sends; receives and returns s_i * (senders - own) if it reduces
        own = 1 if member.sends else 0
        row = np.zeros(count + 1)
        row[i] = (2 * (senders - own) - own) / bandwidth
        row[-1] = -1.0
        rows.append(row)
        bounds_b.append(-own / bandwidth)
    equality = np.zeros((1, count + 1))
    equality[0, reducers] = 1.0
    bounds = [(0.0, 1.0) if m.reduces else (0.0, 0.0) for m in members] + [(0.0, None)]
    result = linprog(cost, A_ub=np.array(rows), b_ub=np.array(bounds_b), A_eq=equality, b_eq=[1.0],
                     bounds=bounds, method="highs")
    if not result.success:
        equal = 1.0 / len(reducers)
        return [equal if m.reduces else 0.0 for m in members]
    return [float(x) for x in result.x[:count]]


def _balanced(reducers: list[int], slope: list[int], own: list[int], bandwidth: list[float]) -> list[float]:
    """Water-filling: the level L at which reducers, each given the share that makes its time L
    (none if its own sending alone takes longer), share exactly everything."""
    order = sorted(reducers, key=lambda i: own[i] / bandwidth[i])
    for k in range(1, len(order) + 1):
        active = order[:k]
        level = (1 + sum(own[i] / slope[i] for i in active)) / sum(bandwidth[i] / slope[i] for i in active)
        if k == len(order) or level <= own[order[k]] / bandwidth[order[k]]:
            break
    fractions = [0.0] * len(slope)
    for i in active:
        fractions[i] = max(0.0, (level * bandwidth[i] - own[i]) / slope[i])
    total = sum(fractions)
    return [x / total for x in fractions]


def spans(total: int, fractions: list[float]) -> list[tuple[int, int]]:
    """Contiguous [start, end) spans of `total` elements sized by `fractions` (rounded, exact total)."""
    bounds = np.round(np.cumsum([0.0, *fractions]) / max(sum(fractions), 1e-12) * total).astype(np.int64)
    bounds[-1] = total
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(len(fractions))]

"""How a group splits the work of an all-reduce: shares by declared bandwidth (clients reduce
nothing, auxiliary peers something; the slowest peer's time is minimal, checked against a
brute-force search) and spans that cover the flattened tensors exactly."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apiary.averaging.spans import Member, Role, shares, spans


def group(*peers: tuple[str, float]) -> list[Member]:
    """Members from (role, bandwidth) pairs."""
    return [Member(f"peer{i}", "" if role == "client" else f"127.0.0.1:{7000 + i}", Role(role), bandwidth)
            for i, (role, bandwidth) in enumerate(peers)]


def peer_times(members: list[Member], fractions: list[float]) -> list[float]:
    """Each peer's time under the documented traffic model: per element of the vector, a sender
    sends the (1 - s) it does not reduce; a reducer receives its share from every other sender
    and sends the mean back, 2 * s * (other senders)."""
    senders = sum(m.role is not Role.AUX for m in members)
    times = []
    for member, share in zip(members, fractions):
        own = 1 if member.role is not Role.AUX else 0
        times.append((own * (1 - share) + 2 * share * (senders - own)) / member.bandwidth)
    return times


def brute_force_time(members: list[Member], steps: int) -> float:
    """The smallest slowest-peer time over a grid of shares (multiples of 1/steps)."""
    reducers = [i for i, m in enumerate(members) if m.role is not Role.CLIENT]
    best = float("inf")
    for head in itertools.product(range(steps + 1), repeat=len(reducers) - 1):
        if sum(head) > steps:
            continue
        fractions = [0.0] * len(members)
        for i, count in zip(reducers, [*head, steps - sum(head)]):
            fractions[i] = count / steps
        best = min(best, max(peer_times(members, fractions)))
    return best


def check_shares(members: list[Member], fractions: list[float]) -> None:
    assert len(fractions) == len(members)
    assert sum(fractions) == pytest.approx(1.0, abs=1e-9)
    for member, share in zip(members, fractions):
        assert -1e-12 <= share <= 1 + 1e-12
        if member.role is Role.CLIENT:
            assert share == 0.0


# ---------------------------------------------------------------- roles


@pytest.mark.parametrize("roles", [
    ["node"], ["node", "node"], ["node", "client"], ["node", "aux"], ["client", "aux"], ["aux", "aux"],
    ["node", "node", "client", "aux"], ["client", "client", "client", "aux"], ["node", "client", "client", "aux", "aux"],
])
def test_clients_reduce_nothing_and_others_share_the_rest(roles):
    members = group(*((role, 1e8) for role in roles))
    fractions = shares(members)
    check_shares(members, fractions)
    senders = sum(role != "aux" for role in roles)
    for role, share in zip(roles, fractions):
        if role == "aux" and (senders >= 2 or (senders == 1 and "node" not in roles)):
            assert share > 0.01  # an auxiliary peer takes load off the senders
        if role == "node" and senders > 1 and "aux" not in roles:
            assert share > 0.01


def test_a_lone_sender_reduces_everything_itself():
    """One node and auxiliary peers: the node moving nothing at all is fastest."""
    members = group(("aux", 1e8), ("node", 1e8), ("aux", 1e8))
    assert shares(members) == pytest.approx([0.0, 1.0, 0.0], abs=1e-9)


def test_equal_peers_get_equal_shares():
    for count in range(1, 9):
        assert shares(group(*[("node", 5e7)] * count)) == pytest.approx([1 / count] * count, abs=1e-9)
    fractions = shares(group(("node", 1e8), ("aux", 1e8), ("node", 1e8), ("aux", 1e8), ("client", 1e8)))
    assert fractions[0] == pytest.approx(fractions[2], abs=1e-9)
    assert fractions[1] == pytest.approx(fractions[3], abs=1e-9)


def test_a_group_without_a_reducer_is_refused():
    with pytest.raises(ValueError, match="at least one member that reduces"):
        shares(group(("client", 1e8), ("client", 1e8)))
    with pytest.raises(ValueError, match="at least one member that reduces"):
        shares([])


# ---------------------------------------------------------------- bandwidths


def random_groups(seed: int, count: int, roles: tuple[str, ...], max_size: int) -> list[list[Member]]:
    rng = random.Random(seed)
    groups = []
    while len(groups) < count:
        peers = [(rng.choice(roles), rng.choice([1.0, 2.0, 3.0, 4.0, 5.0, 8.0, 10.0])) for _ in range(rng.randint(1, max_size))]
        if any(role != "client" for role, _ in peers):
            groups.append(group(*peers))
    return groups


def test_shares_follow_bandwidths_among_nodes():
    """Among nodes, more bandwidth never means a smaller share (so twice the bandwidth gets at
    least as much, and equal bandwidth gets equal shares), also when a slow peer alone decides
    the round's time and the others could split their work in many ways."""
    cases = random_groups(seed=1, count=300, roles=("node",), max_size=6)
    cases += [group(*(("node", b) for b in bandwidths)) for bandwidths in
              ([10, 10, 10, 1], [10, 2, 5, 10], [3, 10, 8, 1], [1, 2], [1, 2, 4, 8])]
    for members in cases:
        fractions = shares(members)
        check_shares(members, fractions)
        for (a, share_a), (b, share_b) in itertools.product(zip(members, fractions), repeat=2):
            if b.bandwidth >= a.bandwidth:
                assert share_b >= share_a - 1e-9, ([m.bandwidth for m in members], fractions)
    twice = shares(group(("node", 1.0), ("node", 2.0), ("node", 1.5)))
    assert twice[1] >= twice[0] and twice[1] > 0


@pytest.mark.parametrize("roles", [("node",), ("node", "client"), ("node", "aux"), ("node", "client", "aux")])
def test_slowest_peer_time_is_minimal(roles):
    """The slowest peer's time under the shares equals the best a brute-force search finds (on a
    grid of shares, so the search may be up to one grid step worse, never better)."""
    for members in random_groups(seed=len(roles), count=40, roles=roles, max_size=4):
        reducers = sum(m.role is not Role.CLIENT for m in members)
        if reducers > 3:
            continue
        steps = 400 if reducers <= 2 else 100
        fractions = shares(members)
        check_shares(members, fractions)
        achieved = max(peer_times(members, fractions))
        searched = brute_force_time(members, steps)
        slack = max(2 * len(members) / (steps * m.bandwidth) for m in members)  # one grid step of any share
        assert achieved <= searched + 1e-9, (members, fractions)
        assert achieved >= searched - slack, (members, fractions)


# ---------------------------------------------------------------- spans


@settings(max_examples=300, deadline=None)
@given(total=st.integers(0, 10**7),
       fractions=st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1.0)), min_size=1, max_size=40).filter(lambda f: sum(f) > 0))
def test_spans_cover_everything_once(total, fractions):
    result = spans(total, fractions)
    assert len(result) == len(fractions)
    assert result[0][0] == 0 and result[-1][1] == total
    for (start, end), (next_start, _) in zip(result, result[1:]):
        assert next_start == end  # no gap, no overlap
    scale = total / sum(fractions)
    for (start, end), fraction in zip(result, fractions):
        assert end >= start
        assert abs((end - start) - fraction * scale) <= 1.0 + 1e-9 * total
        if fraction == 0.0:
            assert end == start


def test_spans_of_shares_split_real_groups():
    members = group(("node", 1e8), ("client", 5e7), ("aux", 2e8), ("node", 3e7))
    result = spans(1_000_003, shares(members))
    assert result[1] == (result[1][0], result[1][0])  # the client's span is empty
    assert sum(end - start for start, end in result) == 1_000_003
    assert np.all(np.diff([start for start, _ in result]) >= 0)

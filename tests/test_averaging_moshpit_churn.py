"""Moshpit averaging under churn: peers absent from rounds and peers SIGKILLed mid-round.

Sixteen averagers on a 4 x 4 grid (groups of four) over real sockets, hosted in five processes
(the two that are killed each run alone in theirs, so a SIGKILL takes exactly one averager).
About 10% of the peers fail each round: some sit a round out and come back in the next, and two
are SIGKILLed at a random moment of a round, never to return. The peers absent from the first
round must average with the established grid in the next; lines short of four must pair up
(a group larger than a line forms); peers that missed a round come back with `rejoin_weight`
0.01, so every group holding one ends at the mean of its fresh members (a returning peer all
but adopts its group's average instead of mixing its stale values back in); and the survivors'
spread after 8 rounds must be within 3e-3 of the initial one.

Before the fix, a peer absent from the first round met only the other first-round absentees
under the wildcard key (so it averaged alone or in a pair), and a group missing a member
renumbered its members' places, piling peers onto some cells and emptying others (groups of
three and two where four were present). The pure-logic tests pin the rules that fixed it.
With the grid fixed, short lines averaging alone and returning peers mixed in at full weight,
no group was larger than four and the groups holding a returning peer ended at the plain mean
of their members (the test fails at both), and the spread after 8 rounds was 3.4e-3 to 1.8e-2
over our runs; now it was 4.7e-5 to 1.3e-3 over eight runs (seven within 1e-3). Issue 13 asks for 1e-3 within 8
rounds at 10% failures: the simulation's median is 9.4e-5 (benchmarks/moshpit_churn.py), but
not every run keeps 1e-3, hence the bound of 3e-3 on one run.
"""

from __future__ import annotations

import random
import time

import torch
from averaging_harness import AveragingSwarm, PeerResult, make_tensors

from apiary.averaging.grid import MoshpitGrid, claim_places
from apiary.averaging.matchmaking import short_partner

PEERS, ROUNDS = 16, 8
PERIOD = 3.2  # gather 0.8 + join 0.8 + the all-reduce (a dead sender costs the 1 s sender timeout)
CHURN = {"target_group_size": 4, "min_group_size": 2, "expected_peers": PEERS, "shapes": [[32]],
         "gather_seconds": 0.8, "join_seconds": 0.8, "sender_timeout": 1.0, "round_timeout": 6.0,
         "rounds": ROUNDS, "period": PERIOD, "rejoin_weight": 0.01}
HOSTS = [[0], list(range(1, 8)), list(range(8, 14)), [14], [15]]  # averagers of each process
KILLED = {14: 2, 15: 5}  # averager -> the round in which its process is SIGKILLed
ABSENT_PER_ROUND = [2, 1, 1, 2, 1, 1, 2, 1]  # with the kills: 13 failures in 128 peer-rounds


def schedule(seed: int = 13) -> tuple[dict[int, list[int]], dict[int, float]]:
    """Which rounds each averager sits out (taking the others in a shuffled order, so that every
    one of them misses a round or two), and when (seconds into its round) each victim dies."""
    rng = random.Random(seed)
    order = [i for i in range(PEERS) if i not in KILLED]
    rng.shuffle(order)
    turns = iter(order * ROUNDS)
    absent: dict[int, list[int]] = {i: [] for i in range(PEERS)}
    for round_index, count in enumerate(ABSENT_PER_ROUND):
        for _ in range(count):
            absent[next(turns)].append(round_index)
    return absent, {victim: rng.uniform(0.0, PERIOD) for victim in KILLED}


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors]).double()


def value_after(result: PeerResult, round_index: int) -> torch.Tensor:
    """The peer's flattened tensors after a round (unchanged through the rounds it sat out)."""
    value = flat(result.initial)
    for record, history in zip(result.rounds, result.history):
        if record.round <= round_index:
            value = history.double()
    return value


def spreads(results: list[PeerResult], initial: torch.Tensor) -> list[float]:
    """After each round: the largest max - min of any coordinate over the survivors, over the
    initial max - min (of all the peers) averaged over the coordinates. It never grows: groups
    average, and the dead leave."""
    reference = (initial.max(0).values - initial.min(0).values).mean().item()
    out = []
    for round_index in range(ROUNDS):
        values = torch.stack([value_after(r, round_index) for r in results])
        out.append((values.max(0).values - values.min(0).values).max().item() / reference)
    return out


def returns(results: list[PeerResult], rejoin_weight: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each group that held a peer back from missed rounds, a fresh peer, no killed peer, and
    completed its round (every member ends with the same values): the values its members ended
    with, and the mean of the values they came with, weighted 1 for the fresh members (they
    averaged in the round before) and `rejoin_weight` for the returning ones."""
    by_id = {r.peer_id: r for r in results}
    out = []
    for round_index in range(1, ROUNDS):
        groups = {tuple(record.members) for r in results for record in r.rounds
                  if record.round == round_index and record.members and set(record.members) <= set(by_id)}
        for members in groups:
            ended = torch.stack([value_after(by_id[m], round_index) for m in members])
            fresh = [any(record.round == round_index - 1 and record.size for record in by_id[m].rounds) for m in members]
            if all(fresh) or not any(fresh) or not torch.allclose(ended, ended[0].expand_as(ended), atol=1e-6):
                continue
            came = torch.stack([value_after(by_id[m], round_index - 1) for m in members])
            weights = torch.tensor([1.0 if f else rejoin_weight for f in fresh], dtype=torch.float64)
            out.append((ended[0], weights @ came / weights.sum()))
    return out


def test_latecomers_join_the_grid_and_returning_averagers_adopt_their_group_average_under_10_percent_churn():
    absent, death = schedule()
    configs = [{**CHURN, "seed": 700 + i, "identity_seed": 700 + i, "skip_rounds": absent[i]} for i in range(PEERS)]
    workers = [{**configs[host[0]], "co_hosted": [configs[i] for i in host[1:]]} if len(host) > 1 else configs[host[0]]
               for host in HOSTS]
    with AveragingSwarm(workers, start_timeout=90.0) as swarm:
        assert swarm.t0 is not None
        for victim, round_index in KILLED.items():
            worker = next(w for w, host in enumerate(HOSTS) if host == [victim])
            swarm.kill_at(worker, swarm.t0 + round_index * PERIOD + death[victim])
        results = swarm.results(ROUNDS * PERIOD + 30.0)
    assert len(results) == PEERS - len(KILLED)
    sizes = [[record.size for record in r.rounds] for r in results]
    placed = {r.peer_id for r in results if 0 not in absent[r.index]} | {swarm.peer_ids[v] for v in KILLED}
    for result in results:  # the latecomers of round 0 average with the established grid in round 1
        if 0 in absent[result.index]:
            members = next(record.members for record in result.rounds if record.round == 1)
            assert members is not None and placed & set(members), f"peer {result.index} in round 1: {members}"
    largest = max(record.size or 0 for r in results for record in r.rounds)  # two short lines averaged together
    assert largest > CHURN["target_group_size"], f"no group larger than a line: {sizes}"
    checked = returns(results, CHURN["rejoin_weight"])  # a returning peer adopts its group's average
    assert checked, "no complete group held a returning peer"
    for ended, expected in checked:
        assert torch.allclose(ended, expected, atol=1e-5), f"ended {ended[:4]}, the fresh members' mean {expected[:4]}"
    initial = torch.stack([flat(make_tensors(700 + i, CHURN["shapes"])) for i in range(PEERS)])
    report = spreads(results, initial)
    assert report[-1] <= 3e-3, f"spread after each round: {[f'{s:.3g}' for s in report]}; group sizes {sizes}"
    print("spread after each round:", " ".join(f"{s:.3g}" for s in report), "; group sizes", sizes)


# ---------------------------------------------------------------- the rules, without sockets


def test_a_peer_absent_from_the_first_round_looks_for_the_established_grid():
    """A peer whose first round is round 1 announces under a line of the grid (the key names
    every coordinate but the round's axis), not under the first round's wildcard key where only
    other latecomers would be; in round 0 an unplaced peer still sees the whole swarm."""
    late = MoshpitGrid.for_swarm(16, 4)
    assert late.key(0) == "*.*"
    key = late.key(1)
    assert key.endswith(".*") and key.split(".")[0].isdigit(), key
    assert late.place(1) is None  # it has no place to announce yet: it claims a free one


def test_a_line_missing_a_peer_keeps_everyone_in_place_and_a_newcomer_takes_the_free_place():
    """Places survive a partial group (no renumbering into the absent peer's place), duplicates
    and newcomers take the line's free places, and a full line leaves a newcomer where it was."""
    assert claim_places({"a": 0, "c": 2, "d": 3}, 4) == {"a": 0, "c": 2, "d": 3}
    assert claim_places({"a": 0, "c": 2, "d": 3, "n": None}, 4) == {"a": 0, "c": 2, "d": 3, "n": 1}
    assert claim_places({"a": 1, "b": 1, "c": 2}, 4) == {"a": 1, "b": 0, "c": 2}
    assert claim_places({"a": 0, "b": 1, "c": 2, "d": 3, "n": None}, 4)["n"] is None
    grid = MoshpitGrid(2, 4)
    grid.settle_at(6)  # rank 6 of a full grid: (2, 1)
    grid.settle_line(0, {"me": 2, "x": 0, "y": 3}, "me")
    assert grid.coords == [2, 1]


def test_lines_short_of_the_group_size_pair_up_in_key_order():
    """Every peer of a round computes the same pairs from the same counts: short lines (not
    empty, not full) pair in key order, an odd one out and full lines average alone."""
    counts = {"*.0": 3, "*.1": 4, "*.2": 2, "*.3": 3}
    assert [short_partner(counts, key, 4) for key in counts] == ["*.2", None, "*.0", None]
    assert short_partner({"*.0": 3, "*.1": 0, "*.2": 1}, "*.0", 4) == "*.2"
    assert short_partner({"*.0": 3, "*.1": 4}, "*.0", 4) is None

"""Moshpit averaging under churn, simulated: how fast the spread shrinks against the failure rate.

Runs the averager's own grouping logic (`MoshpitGrid` keys, places and steps aside;
`matchmaking.my_group` cutting a key's announcers into groups) in virtual rounds, with no
sockets and no clock: every round, each present peer is put under its group key (a newcomer
first joins the least crowded of the lines it probes), finds its group as the matchmaker would,
averages with it, and updates its grid place as the averager does. Failures: each peer alive
fails a round with probability `rate`; a quarter of the failures are kills (the peer announced,
then died at a random moment: before its group formed, or during the all-reduce, when its span
of the vector stays unaveraged), the others absences (it skips the round, back in the next).

Grid rules: *paired* (what the averager does): a line short of the group size averages together
with another short line of the round (`matchmaking.short_partner`, for every line at once: `short_pairs`); *unpaired*: each line alone
(before).

How a peer that missed rounds (absent, its group failed, or new to a running swarm) comes back:
- mix: at full weight, its stale values mixed into its group's average (`rejoin_weight` 1);
- halve: its weight halved per round missed;
- adopt: at weight 0.01, all but adopting its group's average (`rejoin_weight` 0.01, what
  `Averager` does with that setting; a group made only of returning peers still averages);
- catch up: simulation only: it first copies the values of a peer of the line it missed (one
  more download of the vector, from one peer it must trust), then averages at full weight
  (adopts when no such peer is left).

The spread is the largest max - min of any coordinate over the surviving peers, over the
initial max - min averaged over the coordinates (so it starts above 1). Printed for each
failure rate, grid rule and rejoin rule: the median spread after each round over `--trials` swarms, the
share of swarms within `--target` after the last round, the contraction per round (the median
over swarms of the final spread to the power 1 / rounds) and the drift (the median over swarms
of the largest distance of the survivors' mean from the mean of all the initial values, in the
same unit: the killed peers' values leave with them; adopting also drops the stale share of
the returning peers). The reference, measured in the same run on
the same failures: random groups of the same size drawn afresh every round (the Moshpit paper's
random-group model) with mixing; the grid with no failure is exact after `dims` rounds. A last
table gives the median spread after the last round against the failure rate.

Usage: python benchmarks/moshpit_churn.py [--peers 16] [--group 4] [--rounds 8]
                                          [--trials 200] [--rates 0,0.05,0.1,0.15,0.2,0.25,0.3] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from apiary.averaging.grid import MoshpitGrid
from apiary.averaging.matchmaking import my_group, short_pairs
from measure import percentile
from record import save

Grouping = Callable[["Swarm", int, list[str]], list[list[str]]]  # the group of each present peer


@dataclass
class Peer:
    grid: MoshpitGrid
    values: torch.Tensor
    start: torch.Tensor  # the values it started with
    alive: bool = True
    averaged: int = -1  # the last round this peer averaged in (-1: none yet)


class Swarm:
    """Peers by id, their values and grid places."""

    def __init__(self, peers: int, group: int, dim: int, seed: int):
        self.group = group
        self.rng = random.Random(seed)
        random.seed(seed)  # the grids' random starting coordinates
        values = torch.randn(peers, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        self.peers = {f"{self.rng.getrandbits(64):016x}": Peer(MoshpitGrid.for_swarm(peers, group), row, row)
                      for row in values}
        self.initial = self.spread_of(list(self.peers)).mean().item()

    def spread_of(self, ids: list[str]) -> torch.Tensor:
        """max - min of each coordinate over the peers `ids`."""
        values = torch.stack([self.peers[i].values for i in ids])
        return values.max(0).values - values.min(0).values

    def spread(self) -> float:
        return self.spread_of([i for i, peer in self.peers.items() if peer.alive]).max().item() / self.initial

    def drift(self) -> float:
        """How far the survivors' mean is from the mean of every peer's initial values (the
        largest coordinate), over the initial spread."""
        now = torch.stack([peer.values for peer in self.peers.values() if peer.alive]).mean(0)
        then = torch.stack([peer.start for peer in self.peers.values()]).mean(0)
        return (now - then).abs().max().item() / self.initial


def grid_groups(swarm: Swarm, round_index: int, present: list[str], pair_short: bool = True) -> list[list[str]]:
    """Each present peer's group, as the averager forms it: announce under the round's key, read
    the key's announcers, take our group among them (with the announcers of the partner line
    when ours is short, unless not `pair_short`: the rule before); then update the grid place."""
    lines: dict[str, list[str]] = defaultdict(list)
    newcomers: list[str] = []
    for peer_id in present:
        grid = swarm.peers[peer_id].grid
        if grid.ranks_in(round_index) or grid.settled:
            lines[grid.key(round_index)].append(peer_id)
        else:
            newcomers.append(peer_id)
    unseen = set(newcomers)
    for peer_id in newcomers:  # they probe once the others have announced, and see no other newcomer
        grid = swarm.peers[peer_id].grid
        probed = grid.lines(round_index, grid.side, swarm.rng)
        counts = [sum(i not in unseen for i in lines.get(grid.key(round_index, line), [])) for line in probed]
        grid.coords = probed[counts.index(min(counts))]
        lines[grid.key(round_index)].append(peer_id)
    some = swarm.peers[present[0]].grid if present else None
    every_line = [] if some is None or some.ranks_in(round_index) or not pair_short else \
        [some.key(round_index, line) for line in some.lines(round_index, some.side ** (some.dims - 1), swarm.rng)]
    counts = {key: len(lines.get(key, [])) for key in every_line}
    partners = short_pairs(counts, swarm.group) if len(every_line) > 1 else {}  # short_partner of every line
    outcome = []
    for key, members in lines.items():
        ordered = sorted(members)
        places = {i: swarm.peers[i].grid.place(round_index) for i in ordered}
        partner = partners.get(key)
        together = sorted(members + lines[partner]) if partner is not None else ordered
        for rank, peer_id in enumerate(ordered):
            grid = swarm.peers[peer_id].grid
            ranking = grid.ranks_in(round_index)
            line_of = (lambda r, grid=grid: grid.line_of(round_index, r)) if ranking else None
            group = my_group(together, peer_id, swarm.group * (2 if partner is not None else 1), line_of)
            outcome.append((group, places, ranking, rank, peer_id))
    for group, places, ranking, rank, peer_id in outcome:  # places move only once every group is known
        grid = swarm.peers[peer_id].grid
        if ranking:
            grid.settle_at(rank)
        else:
            grid.settle_line(round_index, places, peer_id)
        if len(group) < 2:
            grid.step_aside(round_index)
    return [group for group, *_ in outcome]


def random_groups(swarm: Swarm, round_index: int, present: list[str]) -> list[list[str]]:
    """The reference: the present peers shuffled and cut into groups of the target size."""
    shuffled = present[:]
    swarm.rng.shuffle(shuffled)
    return [my_group(shuffled, peer_id, swarm.group) for peer_id in shuffled]


@dataclass(frozen=True)
class Rejoin:
    """How a peer that missed the rounds before this one comes back."""

    name: str
    factor: Callable[[int], float]  # rounds missed -> factor on its weight
    catch_up: bool = False  # first copy the values of a peer of the line it missed

    def weight(self, missed: int) -> float:
        return self.factor(missed) if missed > 0 else 1.0


MIX = Rejoin("mix", lambda missed: 1.0)
HALVE = Rejoin("halve", lambda missed: 0.5**missed)
ADOPT = Rejoin("adopt", lambda missed: 0.01)
CATCH_UP = Rejoin("catch up", lambda missed: 0.01, catch_up=True)


def catch_up(swarm: Swarm, round_index: int, present: list[str]) -> None:
    """Each present peer that missed the last round copies the values of a peer of its line of
    that round that averaged in it (the lowest peer id), and counts as having averaged."""
    for peer_id in present:
        me = swarm.peers[peer_id]
        if round_index == 0 or me.averaged == round_index - 1 or not me.grid.settled:
            continue
        axis = (round_index - 1) % me.grid.dims
        mates = [i for i, peer in swarm.peers.items() if peer.alive and peer.averaged == round_index - 1
                 and all(a == b for k, (a, b) in enumerate(zip(peer.grid.coords, me.grid.coords)) if k != axis)]
        if mates:
            me.values = swarm.peers[min(mates)].values.clone()
            me.averaged = round_index - 1


def run_round(swarm: Swarm, round_index: int, rate: float, grouping: Grouping, rejoin: Rejoin,
              failures: random.Random) -> None:
    alive = [i for i, peer in swarm.peers.items() if peer.alive]
    failing = [i for i in alive if failures.random() < rate]
    killed = [i for i in failing if failures.random() < 0.25]
    killed_late = [i for i in killed if failures.random() < 0.5]  # died during the all-reduce
    present = [i for i in alive if i not in failing or i in killed]
    if rejoin.catch_up:
        catch_up(swarm, round_index, present)
    groups = sorted({tuple(sorted(group)) for group in grouping(swarm, round_index, present)})
    before = {i: swarm.peers[i].values.clone() for i in present}
    for group in groups:
        if group[0] in killed and group[0] not in killed_late:
            continue  # its leader (the lowest peer id) died before answering the joiners: no group
        members = [i for i in group if i not in killed or i in killed_late]
        if len(members) < 2:
            continue
        weights = torch.tensor([rejoin.weight(round_index - swarm.peers[i].averaged - 1) for i in members],
                               dtype=torch.float64)
        mean = weights @ torch.stack([before[i] for i in members]) / weights.sum()
        spans = torch.tensor_split(torch.arange(mean.numel()), len(members))
        for member in members:
            averaged = mean.clone()
            for lost, span in zip(members, spans):
                if lost in killed_late:  # its reducer died: everyone keeps its own values there
                    averaged[span] = before[member][span]
            swarm.peers[member].values = averaged
            swarm.peers[member].averaged = round_index
    for i in killed:
        swarm.peers[i].alive = False


def trial(peers: int, group: int, rounds: int, rate: float, grouping: Grouping, rejoin: Rejoin,
          seed: int) -> tuple[list[float], float]:
    """The spread after each round, and the drift after the last one."""
    swarm = Swarm(peers, group, 32, seed)
    failures = random.Random(seed + 1)  # the same failures for every grouping
    spreads = []
    for round_index in range(rounds):
        run_round(swarm, round_index, rate, grouping, rejoin, failures)
        spreads.append(swarm.spread())
    return spreads, swarm.drift()


def summary(runs: list[tuple[list[float], float]], target: float) -> dict[str, object]:
    """The median spread after each round, the share within `target`, the contraction, the drift."""
    rounds = len(runs[0][0])
    return {
        "median_spread": [statistics.median(run[r] for run, _ in runs) for r in range(rounds)],
        "within_target": sum(run[-1] <= target for run, _ in runs) / len(runs),  # the spread never grows
        "contraction": statistics.median(run[-1] ** (1 / rounds) for run, _ in runs),
        "drift": statistics.median(drift for _, drift in runs),
        "p90_final_spread": percentile([run[-1] for run, _ in runs], 0.9),
    }


def unpaired_grid_groups(swarm: Swarm, round_index: int, present: list[str]) -> list[list[str]]:
    """The grid before short lines paired up: each line averages alone."""
    return grid_groups(swarm, round_index, present, pair_short=False)


VARIANTS: list[tuple[str, Grouping, Rejoin]] = [
    ("unpaired, mix (before)", unpaired_grid_groups, MIX),
    ("unpaired, halve", unpaired_grid_groups, HALVE),
    ("unpaired, adopt", unpaired_grid_groups, ADOPT),
    ("unpaired, catch up", unpaired_grid_groups, CATCH_UP),
    ("paired, mix", grid_groups, MIX),
    ("paired, adopt", grid_groups, ADOPT),
    ("random groups, mix (ref)", random_groups, MIX),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=16)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--rates", default="0,0.05,0.1,0.15,0.2,0.25,0.3")
    parser.add_argument("--target", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    grid = MoshpitGrid.for_swarm(args.peers, args.group)
    print(f"{args.peers} peers, groups of {args.group} ({grid.dims}-D grid of side {grid.side}), "
          f"{args.rounds} rounds, {args.trials} trials per line; median spread after each round")
    header = " ".join(f"{'r' + str(r + 1):>8}" for r in range(args.rounds))
    print(f"{'failures, grid, rejoin':>28} | {header} | <= {args.target:g} | contraction | drift")
    finals: dict[float, list[float]] = {}
    lines = []
    for rate in (float(r) for r in args.rates.split(",")):
        for name, grouping, rejoin in VARIANTS:
            runs = [trial(args.peers, args.group, args.rounds, rate, grouping, rejoin, args.seed + t)
                    for t in range(args.trials)]
            line = summary(runs, args.target)
            cells = " ".join(f"{m:8.2e}" for m in line["median_spread"])
            print(f"{f'{rate:.0%} {name}':>28} | {cells} | {line['within_target']:6.1%} | "
                  f"{line['contraction']:11.3f} | {line['drift']:.1e}", flush=True)
            lines.append({"failures": rate, "variant": name, **line})
            finals.setdefault(rate, []).append(statistics.median(run[-1] for run, _ in runs))
    print(f"\nmedian spread after {args.rounds} rounds against the failure rate "
          "(ratio: before / paired adopt, same failures)")
    print(f"{'failures':>8} | " + " | ".join(f"{name:>24}" for name, *_ in VARIANTS) + " | ratio")
    for rate, row in finals.items():
        ratio = f"{row[0] / row[5]:5.1f}" if row[5] > 0 else "    -"
        print(f"{rate:8.0%} | " + " | ".join(f"{value:24.2e}" for value in row) + f" | {ratio}")
    save("moshpit_churn", {"peers": args.peers, "group": args.group, "rounds": args.rounds, "trials": args.trials,
                           "target": args.target, "seed": args.seed, "lines": lines})


if __name__ == "__main__":
    main()

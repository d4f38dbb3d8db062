"""Moshpit averaging under churn, simulated: how fast the spread shrinks against the failure rate.

Runs the averager's own grouping logic (`MoshpitGrid` keys, places and steps aside;
`matchmaking.my_group` cutting a key's announcers into groups) in virtual rounds, with no
sockets and no clock: every round, each present peer is put under its group key (a newcomer
first joins the least crowded of the lines it probes), finds its group as the matchmaker would,
averages with it, and updates its grid place as the averager does. Failures: each peer alive
fails a round with probability `rate`; a quarter of the failures are kills (the peer announced,
then died at a random moment: before its group formed, or during the all-reduce, when its span
of the vector stays unaveraged), the others absences (it skips the round, back in the next).

The spread is the largest max - min of any coordinate over the surviving peers, over the
initial max - min averaged over the coordinates (so it starts above 1). Printed for each
failure rate: the median spread after each round over `--trials` swarms, the share of swarms
within `--target` after the last round, and the contraction per round (the median over swarms
of the final spread to the power 1 / rounds). The reference, measured in the same run on the
same failures: random groups of the same size drawn afresh every round (the Moshpit paper's
random-group model); the grid with no failure is exact after `dims` rounds.

Usage: python benchmarks/moshpit_churn.py [--peers 16] [--group 4] [--rounds 8]
                                          [--trials 200] [--rates 0,0.1,0.2,0.3] [--seed 0]
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
from apiary.averaging.matchmaking import my_group

Grouping = Callable[["Swarm", int, list[str]], list[list[str]]]  # the group of each present peer


@dataclass
class Peer:
    grid: MoshpitGrid
    values: torch.Tensor
    alive: bool = True


class Swarm:
    """Peers by id, their values and grid places."""

    def __init__(self, peers: int, group: int, dim: int, seed: int):
        self.group = group
        self.rng = random.Random(seed)
        random.seed(seed)  # the grids' random starting coordinates
        values = torch.randn(peers, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        self.peers = {f"{self.rng.getrandbits(64):016x}": Peer(MoshpitGrid.for_swarm(peers, group), row)
                      for row in values}
        self.initial = self.spread_of(list(self.peers)).mean().item()

    def spread_of(self, ids: list[str]) -> torch.Tensor:
        """max - min of each coordinate over the peers `ids`."""
        values = torch.stack([self.peers[i].values for i in ids])
        return values.max(0).values - values.min(0).values

    def spread(self) -> float:
        return self.spread_of([i for i, peer in self.peers.items() if peer.alive]).max().item() / self.initial


def grid_groups(swarm: Swarm, round_index: int, present: list[str]) -> list[list[str]]:
    """Each present peer's group, as the averager forms it: announce under the round's key, read
    the key's announcers, take our group among them; then update the grid place."""
    lines: dict[str, list[str]] = defaultdict(list)
    newcomers = []
    for peer_id in present:
        grid = swarm.peers[peer_id].grid
        if grid.ranks_in(round_index) or grid.settled:
            lines[grid.key(round_index)].append(peer_id)
        else:
            newcomers.append(peer_id)
    for peer_id in newcomers:  # they probe once the others have announced, and see no other newcomer
        grid = swarm.peers[peer_id].grid
        probed = grid.lines(round_index, grid.side, swarm.rng)
        counts = [sum(i not in newcomers for i in lines.get(grid.key(round_index, line), [])) for line in probed]
        grid.coords = probed[counts.index(min(counts))]
        lines[grid.key(round_index)].append(peer_id)
    outcome = []
    for members in lines.values():
        ordered = sorted(members)
        places = {i: swarm.peers[i].grid.place(round_index) for i in ordered}
        for rank, peer_id in enumerate(ordered):
            grid = swarm.peers[peer_id].grid
            ranking = grid.ranks_in(round_index)
            line_of = (lambda r, grid=grid: grid.line_of(round_index, r)) if ranking else None
            group = my_group(ordered, peer_id, swarm.group, line_of)
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


def run_round(swarm: Swarm, round_index: int, rate: float, grouping: Grouping, failures: random.Random) -> None:
    alive = [i for i, peer in swarm.peers.items() if peer.alive]
    failing = [i for i in alive if failures.random() < rate]
    killed = [i for i in failing if failures.random() < 0.25]
    killed_late = [i for i in killed if failures.random() < 0.5]  # died during the all-reduce
    present = [i for i in alive if i not in failing or i in killed]
    groups = sorted({tuple(sorted(group)) for group in grouping(swarm, round_index, present)})
    before = {i: swarm.peers[i].values.clone() for i in present}
    for group in groups:
        if group[0] in killed and group[0] not in killed_late:
            continue  # its leader (the lowest peer id) died before answering the joiners: no group
        members = [i for i in group if i not in killed or i in killed_late]
        if len(members) < 2:
            continue
        stacked = torch.stack([before[i] for i in members])
        mean = stacked.mean(0)
        spans = torch.tensor_split(torch.arange(mean.numel()), len(members))
        for member in members:
            averaged = mean.clone()
            for lost, span in zip(members, spans):
                if lost in killed_late:  # its reducer died: everyone keeps its own values there
                    averaged[span] = before[member][span]
            swarm.peers[member].values = averaged
    for i in killed:
        swarm.peers[i].alive = False


def trial(peers: int, group: int, rounds: int, rate: float, grouping: Grouping, seed: int) -> list[float]:
    swarm = Swarm(peers, group, 32, seed)
    failures = random.Random(seed + 1)  # the same failures for every grouping
    spreads = []
    for round_index in range(rounds):
        run_round(swarm, round_index, rate, grouping, failures)
        spreads.append(swarm.spread())
    return spreads


def summary(name: str, runs: list[list[float]], target: float) -> str:
    rounds = len(runs[0])
    medians = [statistics.median(run[r] for run in runs) for r in range(rounds)]
    within = sum(run[-1] <= target for run in runs) / len(runs)  # the spread never grows
    contraction = statistics.median(run[-1] ** (1 / rounds) for run in runs)
    cells = " ".join(f"{m:8.2e}" for m in medians)
    return f"{name:>22} | {cells} | {within:6.1%} | {contraction:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=16)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--rates", default="0,0.1,0.2,0.3")
    parser.add_argument("--target", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    grid = MoshpitGrid.for_swarm(args.peers, args.group)
    print(f"{args.peers} peers, groups of {args.group} ({grid.dims}-D grid of side {grid.side}), "
          f"{args.rounds} rounds, {args.trials} trials per line; median spread after each round")
    header = " ".join(f"{'r' + str(r + 1):>8}" for r in range(args.rounds))
    print(f"{'failures / grouping':>22} | {header} | <= {args.target:g} | contraction per round")
    ratios = []
    for rate in (float(r) for r in args.rates.split(",")):
        finals = []
        for name, grouping in (("grid", grid_groups), ("random groups (ref)", random_groups)):
            runs = [trial(args.peers, args.group, args.rounds, rate, grouping, args.seed + t) for t in range(args.trials)]
            print(summary(f"{rate:.0%} {name}", runs, args.target))
            finals.append(statistics.median(run[-1] for run in runs))
        ratios.append(f"{rate:.0%}: {finals[0] / finals[1]:.2f}")
    print(f"median spread after {args.rounds} rounds, grid / random groups: " + ", ".join(ratios))


if __name__ == "__main__":
    main()

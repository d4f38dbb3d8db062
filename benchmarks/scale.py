"""Progress at swarm scale, in the simulator (tests/sim): the bytes each peer moves for progress
and the load on the busiest node, one key read whole by every peer (before) against sharded
records read by sample (formats/shards.py), at 100 and 1,000 peers (10,000 with --sizes). Reads
are `latest` gets: before, and for the sharded records in the "sharded" row, they ask a key's
nearest nodes to the end, as they did before `read_quorum`; after, they end once `read_quorum`
nodes agree (dht/traversal.py).

Every peer runs a real DHT node on the simulated network (its latencies and uplinks drawn from
the seed) and a real `ProgressTracker` (after) or the one-key store and get the tracker made
before sharding (before). Once the swarm has joined and every peer has written and read once
(so that it knows the swarm's size; past `LEARNED` peers, only the simulated readers learn it by
reading, the other writers start knowing it, which is where a read leaves them), one refresh
round is measured: every peer publishes its
record and reads the swarm's, as a peer near an epoch's end does every `period` seconds (50 ms
before; `final_refresh(shards)` after). A peer's load is the bytes its host sent and received
in the round (its own calls and those it served) over the period; signatures are made and sent
as in production but not verified (the simulator's CPU, not the network's cost).

Moshpit at swarm scale (`--moshpit`, saved apart as scale-moshpit): the averager's own grouping
code (grid keys and places, matchmaking's groups and short-line pairs) in rounds, with 10% of the
peers failing each round as benchmarks/moshpit_churn.py models failures (a quarter of them
killed, the others absent for the round); how many rounds the spread takes to fall to 1e-6 of
the initial one, with groups of the averager's target size (16) and returning peers averaged
at full weight (`rejoin_weight` 1, the default).

    .venv/bin/python benchmarks/scale.py               # 100 and 1,000 peers
    .venv/bin/python benchmarks/scale.py --sizes 100    # a quick look
    .venv/bin/python benchmarks/scale.py --moshpit 1000 10000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moshpit_churn import MIX, grid_groups, run_round  # noqa: E402
from moshpit_churn import Swarm as MoshpitSwarm  # noqa: E402
from record import save  # noqa: E402

from apiary.dht.validation import owner_marker  # noqa: E402
from apiary.optim.epochs import FINAL_REFRESH, final_refresh  # noqa: E402
from apiary.optim.progress import PeerProgress, ProgressTracker, SwarmProgress, progress_key  # noqa: E402
from tests.sim.loop import clock, run  # noqa: E402
from tests.sim.network import Network  # noqa: E402
from tests.sim.swarm import Member, Swarm  # noqa: E402

FULL_READ = 10**6  # a read_quorum no read reaches: latest reads ask the key's nearest nodes to the end
BATCH = 64  # peers refreshing at once in the simulation (bytes do not depend on it)
READERS = 100  # peers whose reads are simulated in the measured round (scaled to every peer)
LEARNED = 4096  # past this many peers only the readers learn the swarm's size by reading (the others are told)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def batched(calls: list[Any]) -> list[Any]:
    results = []
    for i in range(0, len(calls), BATCH):
        results += await asyncio.gather(*(call() for call in calls[i:i + BATCH]))
    return results


def one_key(member: Member, epoch: int) -> tuple[Any, Any]:
    """The store and the get of a refresh as the tracker made them before sharding: every record
    under one key, read whole."""
    node = member.node
    peer_id = node.identity.peer_id

    async def store() -> None:
        now = clock().time()
        record = PeerProgress(peer_id, epoch, 100 * epoch, 10.0, now)
        await node.store(progress_key("before"), record.as_value(), now + 30, subkey=owner_marker(peer_id))

    async def get() -> None:
        await node.get(progress_key("before"), latest=True)

    return store, get


def sharded(tracker: ProgressTracker, epoch: int) -> tuple[Any, Any]:
    async def store() -> None:
        await tracker.publish(epoch, 100 * epoch, 10.0)

    async def get() -> SwarmProgress:
        return await tracker.fetch()

    return store, get


async def round_loads(network: Network, refreshes: list[tuple[Any, Any]], readers: list[int],
                      period: float) -> tuple[dict[str, Any], list[Any]]:
    """One refresh round: every peer writes, `readers` read (their bytes scaled to every peer's).
    Bytes per second per peer (mean), of the busiest peer, and per peer by message kind."""
    network.reset()
    await batched([store for store, _ in refreshes])
    written = (network.sent + network.received).copy()
    network.reset()
    answers = await batched([refreshes[i][1] for i in readers])
    scale = len(refreshes) / len(readers)
    by_key: Counter[tuple[Any, str]] = Counter(written)
    for key, size in (network.sent + network.received).items():
        by_key[key] += size * scale
    hosts: Counter[Any] = Counter()
    methods: Counter[str] = Counter()
    for (endpoint, method), size in by_key.items():
        hosts[endpoint] += size
        methods[method] += size
    peers = len(refreshes)
    return {
        "period_seconds": period,
        "readers_simulated": len(readers),
        "peer_bytes_per_second": sum(hosts.values()) / peers / period,
        "busiest_bytes_per_second": max(hosts.values()) / period,
        "by_method_bytes_per_second": {m: size / peers / period for m, size in sorted(methods.items())},
    }, answers


async def sharded_round(network: Network, trackers: list[ProgressTracker], epoch: int, readers: list[int]
                        ) -> dict[str, Any]:
    """`round_loads` of the sharded records, per second of the refresh period their shards give."""
    probe, views = await round_loads(network, [sharded(t, epoch) for t in trackers], readers, 1.0)
    level = statistics.mode(view.shards for view in views)
    period = final_refresh(level)
    return {"shards": level, **probe, "period_seconds": period,
            "peer_bytes_per_second": probe["peer_bytes_per_second"] / period,
            "busiest_bytes_per_second": probe["busiest_bytes_per_second"] / period,
            "by_method_bytes_per_second": {m: v / period for m, v in probe["by_method_bytes_per_second"].items()}}


async def measure(peers: int, seed: int) -> dict[str, Any]:
    started = time.monotonic()
    network = Network(seed)
    swarm = Swarm(network, seed, verify=False)
    await swarm.grow(peers, batch=128)
    joined = time.monotonic() - started
    members = list(swarm.members)
    readers = sorted(swarm.rng.sample(range(peers), min(READERS, peers)))
    result: dict[str, Any] = {"peers": peers}
    log(f"{peers} peers joined in {joined:.0f} s")
    quorum, swarm.settings.read_quorum = swarm.settings.read_quorum, FULL_READ  # every node shares the settings
    if peers <= 4096:  # past max_subkeys, one key cannot hold every peer's record
        await batched([one_key(m, 1)[0] for m in members])
        result["before"], _ = await round_loads(network, [one_key(m, 2) for m in members], readers, FINAL_REFRESH)
        log(f"{peers} peers: one key measured")
    trackers = [ProgressTracker(m.node, "after", m.node.identity.peer_id, clock=clock()) for m in members]
    starting = trackers
    if peers > LEARNED:  # the writers start as they are once they have read: knowing the swarm's size
        starting, chosen = [trackers[i] for i in readers], set(readers)
        told = [tracker for i, tracker in enumerate(trackers) if i not in chosen]
        for tracker in told:
            tracker._peers = float(peers)
        await batched([sharded(t, 1)[0] for t in told])
    # the swarm starts: each peer learns its size before its first write, reads once, writes again
    await batched([sharded(t, 1)[0] for t in starting])
    await batched([sharded(t, 1)[1] for t in starting])
    await batched([sharded(t, 2)[0] for t in trackers])
    log(f"{peers} peers: the sharded swarm started")
    result["sharded"] = await sharded_round(network, trackers, 4, readers)
    swarm.settings.read_quorum = quorum
    result["after"] = await sharded_round(network, trackers, 5, readers)
    log(f"{peers} peers: sharded measured")
    result["seconds"] = {"join": round(joined, 1), "total": round(time.monotonic() - started, 1)}
    await swarm.close()
    return result


MOSHPIT_TARGET, MOSHPIT_FAILURES, MOSHPIT_GROUP, MOSHPIT_ROUNDS = 1e-6, 0.1, 16, 80


def moshpit(peers: int, seed: int) -> dict[str, Any]:
    """Rounds until the survivors' spread is within MOSHPIT_TARGET of the initial one."""
    started = time.monotonic()
    swarm = MoshpitSwarm(peers, MOSHPIT_GROUP, 8, seed)
    failures = random.Random(seed + 1)
    spreads: list[float] = []
    while len(spreads) < MOSHPIT_ROUNDS and (not spreads or spreads[-1] > MOSHPIT_TARGET):
        run_round(swarm, len(spreads), MOSHPIT_FAILURES, grid_groups, MIX, failures)
        spreads.append(swarm.spread())
    grid = next(iter(swarm.peers.values())).grid
    return {"peers": peers, "group": MOSHPIT_GROUP, "dims": grid.dims, "side": grid.side,
            "failures_per_round": MOSHPIT_FAILURES, "target": MOSHPIT_TARGET,
            "rounds": len(spreads) if spreads[-1] <= MOSHPIT_TARGET else None, "spreads": spreads,
            "survivors": sum(peer.alive for peer in swarm.peers.values()),
            "seconds": round(time.monotonic() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--moshpit", type=int, nargs="+", help="measure Moshpit rounds at these sizes instead")
    args = parser.parse_args()
    if args.moshpit:
        found = []
        for peers in args.moshpit:
            found.append(moshpit(peers, args.seed))
            print({k: v for k, v in found[-1].items() if k != "spreads"}, flush=True)
            save("scale", {"seed": args.seed, "rows": found}, "moshpit")
        return
    rows = []
    for peers in args.sizes:
        rows.append(run(measure(peers, args.seed), args.seed))
        print(rows[-1], flush=True)
        save("scale", {"seed": args.seed, "rows": rows})  # after each size: a long run keeps what it measured


if __name__ == "__main__":
    main()

"""Progress at swarm scale, in the simulator (tests/sim): the bytes each peer moves for progress
and the load on the busiest node, one key read whole by every peer (before) against sharded
records read by sample (formats/shards.py), at 100 and 1,000 peers (10,000 with --sizes). Reads
are `latest` gets: before, and for the sharded records in the "sharded" row, they ask a key's
nearest nodes to the end, as they did before `read_quorum`; after, they end once `read_quorum`
nodes agree (dht/traversal.py). Sharded readers read the shards' sums where the shards'
aggregators publish them (formats/aggregates.py), and past 16 shards the sums of windows of 16
shards, in both rows; the "sharded" row (reads to the end) only up to `--full-reads-up-to` peers
(1,000: at 10,000 it would be half the run).

Every peer runs a real DHT node on the simulated network (its latencies and uplinks drawn from
the seed) and a real `ProgressTracker` (after) or the one-key store and get the tracker made
before sharding (before). Once the swarm has joined and every peer has written and read twice
(so that it knows the swarm's size and the shards' aggregators know they are; past `LEARNED`
peers, only the simulated readers learn it by reading, the other writers start knowing it and
whether they aggregate, which is where reads leave them), one refresh round is measured: every
peer publishes its record, the aggregators read (each as itself) and the readers read (scaled
to every other peer), as peers near an epoch's end do every `period` seconds (50 ms before;
`final_refresh(shards)` after). A peer's load is the bytes its host sent and received
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
import math
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
from apiary.formats.aggregates import designated  # noqa: E402
from apiary.formats.shards import shard_of, write_levels  # noqa: E402
from apiary.optim.epochs import FINAL_REFRESH, final_refresh  # noqa: E402
from apiary.optim.progress import CONFIDENCE, PeerProgress, ProgressTracker, SwarmProgress, progress_key  # noqa: E402
from tests.sim.loop import clock, run  # noqa: E402
from tests.sim.network import Network  # noqa: E402
from tests.sim.swarm import Member, Swarm  # noqa: E402

FULL_READ = 10**6  # a read_quorum no read reaches: latest reads ask the key's nearest nodes to the end
BATCH = 1024  # peers refreshing at once in the simulation: a round's writes all land within seconds of virtual
# time, well inside the records' ttl (64 at a time took longer than the ttl past ~1,000 peers, so the first
# records had expired when the readers read: they saw a smaller swarm)
READERS = 100  # peers whose reads are simulated in the measured round (scaled to every peer)
EPOCH_SECONDS = 10.0  # how far into its epoch the swarm is when a round is measured
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


def sharded(tracker: ProgressTracker, epoch: int, speed: float = 10.0, seconds: float = 0.0) -> tuple[Any, Any]:
    """The store and the get of a refresh of the sharded tracker, `seconds` into `epoch` at `speed` samples/s."""
    async def store() -> None:
        await tracker.publish(epoch, round(speed * seconds), speed)

    async def get() -> SwarmProgress:
        return await tracker.fetch()

    return store, get


async def round_loads(network: Network, refreshes: list[tuple[Any, Any]], readers: list[int],
                      period: float, aggregators: list[int] | None = None) -> tuple[dict[str, Any], list[Any]]:
    """One refresh round: every peer writes, the `aggregators` (the peers that publish their
    shard's sums, formats/aggregates.py) read, each as itself, then `readers` read, their reads
    scaled to every other peer's: a host serves what it served the simulated readers times
    (peers - aggregators)/readers, and makes the reads of one reader (their mean). Bytes per
    second per peer (mean), of the busiest peer, and per peer by message kind."""
    aggregators = aggregators or []
    network.reset()
    await batched([store for store, _ in refreshes])
    await batched([refreshes[i][1] for i in aggregators])
    moved = network.sent + network.received
    hosts: Counter[Any] = Counter()
    methods: Counter[str] = Counter()
    for (endpoint, method), size in moved.items():
        hosts[endpoint] += size
        methods[method] += size
    network.reset()
    answers = await batched([refreshes[i][1] for i in readers])
    peers, scale = len(refreshes), (len(refreshes) - len(aggregators)) / len(readers)
    moved = network.sent + network.received
    for (endpoint, method), size in moved.items():
        hosts[endpoint] += network.served[endpoint, method] * scale  # the calls it answers
        methods[method] += size * scale
    own = sum(moved.values()) - sum(network.served.values())  # the calls the readers made
    for endpoint in list(hosts):  # every peer read (an aggregator is charged a reader's reads too)
        hosts[endpoint] += own / len(readers)
    return {
        "period_seconds": period,
        "readers_simulated": len(readers),
        "peer_bytes_per_second": sum(hosts.values()) / peers / period,
        "busiest_bytes_per_second": max(hosts.values()) / period,
        "by_method_bytes_per_second": {m: size / peers / period for m, size in sorted(methods.items())},
    }, answers


async def sharded_round(network: Network, trackers: list[ProgressTracker], speeds: list[float], epoch: int,
                        readers: list[int]) -> dict[str, Any]:
    """`round_loads` of the sharded records, per second of the refresh period their shards give,
    and how far the readers' counts are from the swarm's: the estimate (what a reader's sample
    says, scaled) over the true count of the other peers' samples, and the epoch's end, the true
    count when a reader's reported count (the estimate less CONFIDENCE standard errors) reaches
    the target, as a multiple of the target. The epoch starts (every peer writes, the readers
    read: they see every peer from then on), `EPOCH_SECONDS` pass, and the round is measured."""
    aggregators = [i for i, tracker in enumerate(trackers) if tracker.aggregated_levels]
    await batched([sharded(t, epoch, speed)[0] for t, speed in zip(trackers, speeds)])
    await batched([sharded(trackers[i], epoch)[1] for i in aggregators])
    await batched([sharded(trackers[i], epoch)[1] for i in readers])
    await asyncio.sleep(EPOCH_SECONDS)
    refreshes = [sharded(t, epoch, speed, EPOCH_SECONDS) for t, speed in zip(trackers, speeds)]
    # steady state, as after a refresh period: the writers' kept replicas and the shards' sums are fresh
    await batched([store for store, _ in refreshes])
    await batched([refreshes[i][1] for i, tracker in enumerate(trackers) if tracker.aggregated_levels])
    aggregators = [i for i, tracker in enumerate(trackers) if tracker.aggregated_levels]
    probe, views = await round_loads(network, refreshes, readers, 1.0, aggregators)
    counts = [round(speed * EPOCH_SECONDS) for speed in speeds]
    truths = [sum(counts) - counts[i] for i in readers]
    estimates = [(view.reported + CONFIDENCE * view.error) / truth for view, truth in zip(views, truths)]
    ends = [truth / view.reported if view.reported > 0 else math.inf for view, truth in zip(views, truths)]
    level = statistics.mode(view.shards for view in views)
    period = final_refresh(level)
    return {"shards": level, **probe, "period_seconds": period, "aggregators": len(aggregators),
            "estimate_over_truth": [min(estimates), statistics.median(estimates), max(estimates)],
            "epoch_end_over_target": [min(ends), statistics.median(ends), max(ends)],
            "peer_bytes_per_second": probe["peer_bytes_per_second"] / period,
            "busiest_bytes_per_second": probe["busiest_bytes_per_second"] / period,
            "by_method_bytes_per_second": {m: v / period for m, v in probe["by_method_bytes_per_second"].items()}}


def designate(told: list[ProgressTracker], trackers: list[ProgressTracker]) -> None:
    """Tells the writers that start knowing the swarm's size which of their shards they aggregate,
    as a read of their shard would: the members ranked lowest at each level they write at."""
    for tracker in told:
        for level in write_levels(tracker._peers or 1.0):
            shards = 2**level
            index = shard_of(tracker.peer_id, shards)
            members = [t.peer_id for t in trackers if shard_of(t.peer_id, shards) == index]
            if tracker.peer_id in designated(members, progress_key("after", shards, index)):
                tracker._aggregating.add(level)


async def measure(peers: int, seed: int, full_reads_up_to: int) -> dict[str, Any]:
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
    swarm.settings.read_quorum = quorum
    trackers = [ProgressTracker(m.node, "after", m.node.identity.peer_id, clock=clock()) for m in members]
    draw = random.Random(seed + 2)  # throughputs: log-normal around 10 samples/s, as peers' GPUs differ
    speeds = [10.0 * math.exp(0.5 * draw.gauss(0, 1)) for _ in members]
    starting = trackers
    if peers > LEARNED:  # the writers start as they are once they have read: knowing the swarm's size
        starting, chosen = [trackers[i] for i in readers], set(readers)
        told = [tracker for i, tracker in enumerate(trackers) if i not in chosen]
        for tracker in told:
            tracker._peers = float(peers)
        designate(told, trackers)
        await batched([sharded(t, 1)[0] for t in told])
    # the swarm starts: each peer learns its size before its first write, reads once, writes again
    await batched([sharded(t, 1)[0] for t in starting])
    await batched([sharded(t, 1)[1] for t in starting])
    await batched([sharded(t, 2)[0] for t in trackers])
    # one more refresh: the shards' aggregators learn that they are (from their shards read whole)
    await batched([sharded(t, 2)[1] for t in starting])
    await batched([sharded(t, 2)[0] for t in starting])
    log(f"{peers} peers: the sharded swarm started")
    result["after"] = await sharded_round(network, trackers, speeds, 4, readers)
    if peers <= full_reads_up_to:  # last: measured before the quorum reads, it left them reading on (at 1,000
        swarm.settings.read_quorum = FULL_READ  # peers 277 kB/s per peer, not 33; why is not found yet)
        result["sharded"] = await sharded_round(network, trackers, speeds, 5, readers)
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
    parser.add_argument("--full-reads-up-to", type=int, default=1000,
                        help="the 'read to the end' row only up to this many peers (at 10,000 it is half the run)")
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
        rows.append(run(measure(peers, args.seed, args.full_reads_up_to), args.seed))
        print(rows[-1], flush=True)
        save("scale", {"seed": args.seed, "rows": rows})  # after each size: a long run keeps what it measured


if __name__ == "__main__":
    main()

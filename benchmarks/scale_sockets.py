"""Progress traffic on real sockets against the simulator: one scenario, the same peers, both ways.

`--peers` peers (256 by default) each run a real DHT node (its own gRPC server on 127.0.0.1,
signed records; plaintext unless `--tls`: the messages are the same, the handshakes of every
pair of nodes cost CPU this machine lacks) and a `ProgressTracker`, spread over `--workers`
processes; the same
identities run in the simulator (tests/sim: the production code over a simulated network in
virtual time, as benchmarks/scale.py runs it). In both, the swarm joins; every peer writes its
record, reads the swarm's and writes again (so that it knows the swarm's size); then `--rounds`
refresh rounds of an epoch (16, `PROBE_EVERY`: by then every peer has probed its shard, and each
shard's aggregators know their role whatever the order of the calls; after one, fewer did on
sockets, where the calls are paced, than in the simulator, where all run at once), and one more
measured: every peer writes its record, the shards' aggregators
read (and publish the shards' sums, formats/aggregates.py), every peer reads. Compared: the bytes
each node served in the measured round by method (its messages' bytes both ways, as
`apiary_dht_rpc_received_bytes_total` and `apiary_dht_rpc_sent_bytes_total` count them on real
sockets and the simulator's `payload` counts them), per peer and for the busiest node, and what
the readers counted (the swarm's size, the shards read). Where both agree, the simulator's
figures at 1,000 and 10,000 peers rest on the same accounting.

On one machine the real nodes share its cores, where a swarm's peers each have their own: at
most `--at-once` peers (64) write or read at a time, so that calls do not queue for CPU past
their deadlines; the nodes' per-peer limits, which take every node on 127.0.0.1 for one peer,
are lifted; and with `--time-scale N` the nodes' clocks run N times slower, so that a round
this machine stretches past the 6 s a shard's sum stays fresh (or the 30 s records live) is
judged in their time as a faster machine would run it (the script says when a round ran past).

    .venv/bin/python benchmarks/scale_sockets.py --peers 128 --workers 4 --time-scale 20
    .venv/bin/python benchmarks/scale_sockets.py --peers 256 --workers 8 --time-scale 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from record import save  # noqa: E402

from apiary.clock import Clock  # noqa: E402
from apiary.dht import DHTNode  # noqa: E402
from apiary.formats.aggregates import MAX_AGE  # noqa: E402
from apiary.optim.progress import PROBE_EVERY, ProgressTracker  # noqa: E402
from apiary.wire import PeerAddress, WireSettings  # noqa: E402
from tests.sim.loop import clock, run  # noqa: E402
from tests.sim.network import Network  # noqa: E402
from tests.sim.swarm import Swarm, identities  # noqa: E402

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
EPOCH_SECONDS = 10.0  # the samples each peer reports in the measured epoch: its throughput times this
JOIN_BATCH = 16  # nodes of a process joining at once
AT_ONCE = 64  # peers of the whole swarm writing or reading at once, by default (each process its share)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def throughputs(seed: int, count: int) -> list[float]:
    """Samples per second of each peer: log-normal around 10, as peers' GPUs differ."""
    draw = random.Random(seed + 2)
    return [10.0 * math.exp(0.5 * draw.gauss(0, 1)) for _ in range(count)]


@dataclass
class Peers:
    """Some of the swarm's peers: their trackers and throughputs (one process's share)."""

    trackers: list[ProgressTracker]
    speeds: list[float]
    at_once: int  # peers writing or reading at the same moment: on one machine, more queue for CPU past their deadlines

    async def _paced(self, calls: list[Awaitable[Any]]) -> list[Any]:
        slots = asyncio.Semaphore(self.at_once)

        async def one(call: Awaitable[Any]) -> Any:
            async with slots:
                return await call

        return await asyncio.gather(*(one(call) for call in calls))

    async def publish(self, epoch: int, seconds: float) -> int:
        return sum(await self._paced([tracker.publish(epoch, round(speed * seconds), speed)
                                      for tracker, speed in zip(self.trackers, self.speeds)]))

    async def fetch(self, aggregators_only: bool) -> list[dict[str, float]]:
        chosen = [t for t in self.trackers if t.aggregated_levels or not aggregators_only]
        views = await self._paced([tracker.fetch() for tracker in chosen])
        return [{"peers": view.peers, "shards": view.shards, "reported": view.reported} for view in views]


class Group(Protocol):
    """The whole swarm, however it runs: in the simulator or over worker processes."""

    async def publish(self, epoch: int, seconds: float) -> int: ...

    async def fetch(self, aggregators_only: bool) -> list[dict[str, float]]: ...

    async def reset(self) -> None: ...

    async def served(self) -> tuple[list[dict[str, float]], Counter[str]]: ...  # since reset: per peer, the bytes it
    # served by method; the calls served, by method


async def scenario(group: Group, peers: int, rounds: int) -> dict[str, Any]:
    """The swarm starts, `rounds` refresh rounds of an epoch run, the next one is measured."""
    await group.publish(1, 0.0)  # each peer learns the swarm's size first
    await group.fetch(False)
    await group.publish(2, 0.0)
    for measured in [False] * rounds + [True]:
        if measured:
            await group.reset()
        started = time.monotonic()
        stored = await group.publish(3, EPOCH_SECONDS)
        aggregators = len(await group.fetch(True))
        views = await group.fetch(False)
        seconds = time.monotonic() - started
    served, calls = await group.served()
    totals = [sum(node.values()) for node in served]
    methods: Counter[str] = Counter()
    for node in served:
        methods.update(node)
    return {"peers": peers, "stored": stored, "round_seconds": round(seconds, 2),
            "aggregators": aggregators,
            "served_per_peer": sum(totals) / peers, "served_busiest": max(totals),
            "served_per_peer_by_method": {m: v / peers for m, v in sorted(methods.items())},
            "calls_per_peer_by_method": {m: v / peers for m, v in sorted(calls.items())},
            "counted_peers": [min(v["peers"] for v in views), statistics.median(v["peers"] for v in views),
                              max(v["peers"] for v in views)],
            "shards": statistics.mode(v["shards"] for v in views)}


class Simulated:
    """The swarm in the simulator (call inside `tests.sim.loop.run`)."""

    def __init__(self, peers: int, seed: int):
        self.count, self.seed = peers, seed

    async def start(self) -> None:
        self.network = Network(self.seed)
        self.swarm = Swarm(self.network, self.seed, verify=False)  # (signatures made and sent, not checked)
        given = identities(self.seed, self.count)
        first = await self.swarm.add(given[0], bootstrap=[])
        for start in range(1, self.count, JOIN_BATCH):  # every node joins through the first, as over sockets
            await asyncio.gather(*(self.swarm.add(identity, bootstrap=[first]) for identity in given[start:start + JOIN_BATCH]))
        trackers = [ProgressTracker(m.node, "sockets", m.node.identity.peer_id, clock=clock()) for m in self.swarm.members]
        self.peers = Peers(trackers, throughputs(self.seed, self.count), at_once=self.count)  # (peers run apart)

    async def publish(self, epoch: int, seconds: float) -> int:
        return await self.peers.publish(epoch, seconds)

    async def fetch(self, aggregators_only: bool) -> list[dict[str, float]]:
        return await self.peers.fetch(aggregators_only)

    async def reset(self) -> None:
        self.network.reset()

    async def served(self) -> tuple[list[dict[str, float]], Counter[str]]:
        by_host: dict[Any, dict[str, float]] = {m.host.endpoint: {} for m in self.swarm.members}
        for (endpoint, method), size in self.network.payload.items():
            by_host[endpoint][method] = by_host[endpoint].get(method, 0) + size
        calls: Counter[str] = Counter()
        for (_, method), count in self.network.calls.items():
            calls[method] += count
        return list(by_host.values()), calls

    async def close(self) -> None:
        await self.swarm.close()


class OverSockets:
    """The swarm over worker processes, each running some of the real nodes (`worker`)."""

    def __init__(self, peers: int, workers: int, seed: int, tls: bool, at_once: int, time_scale: float):
        self.setup = {"count": peers, "seed": seed, "tls": tls, "at_once": max(1, at_once // workers),  # each process's share
                      "time_scale": time_scale, "origin": time.time()}
        self.shares = [(i * peers // workers, (i + 1) * peers // workers) for i in range(workers)]
        self.processes: list[asyncio.subprocess.Process] = []

    async def start(self) -> None:
        for first, end in self.shares:
            initial = self.initial if self.processes else ""  # the first process starts the swarm
            setup = {**self.setup, "first": first, "end": end, "initial": initial}
            process = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--worker", json.dumps(setup),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 24)
            self.processes.append(process)
            ready = json.loads(await asyncio.wait_for(process.stdout.readline(), 600))
            if len(self.processes) == 1:
                self.initial = ready["address"]
            log(f"sockets: peers {first}..{end - 1} joined")

    async def _ask(self, **command: Any) -> list[Any]:
        async def one(process: asyncio.subprocess.Process) -> Any:
            process.stdin.write((json.dumps(command) + "\n").encode())
            await process.stdin.drain()
            line = await asyncio.wait_for(process.stdout.readline(), 600)
            if not line:
                raise RuntimeError(f"a worker ended (exit {await process.wait()})")
            return json.loads(line)

        return await asyncio.gather(*(one(process) for process in self.processes))

    async def publish(self, epoch: int, seconds: float) -> int:
        return sum(await self._ask(op="publish", epoch=epoch, seconds=seconds))

    async def fetch(self, aggregators_only: bool) -> list[dict[str, float]]:
        return [view for views in await self._ask(op="fetch", aggregators_only=aggregators_only) for view in views]

    async def reset(self) -> None:
        await self._ask(op="reset")

    async def served(self) -> tuple[list[dict[str, float]], Counter[str]]:
        answers = await self._ask(op="served")
        return [node for nodes, _ in answers for node in nodes], sum((Counter(calls) for _, calls in answers), Counter())

    async def close(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.stdin.close()
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), 60)
            except TimeoutError:
                process.kill()
                await process.wait()


def allow_open_files(wanted: int) -> None:
    """Raises this process's open-file limit to `wanted` (past the hard limit only with CAP_SYS_RESOURCE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log(f"sockets: {hard} open files allowed, {wanted} wanted: connections may fail past it")


def slowed(time_scale: float, origin: float) -> Clock:
    """A clock running `time_scale` times slower than the real one from `origin` (unix time), the
    same in every process: expirations and freshness judged as if calls took that much less time."""
    started = time.monotonic()
    return Clock(time=lambda: origin + (time.time() - origin) / time_scale,
                 monotonic=lambda: started + (time.monotonic() - started) / time_scale)


async def worker(first: int, end: int, count: int, seed: int, tls: bool, at_once: int, time_scale: float, origin: float,
                 initial: str) -> None:
    """Runs peers first..end-1 of the swarm: real nodes joining through `initial` (the first
    node, when empty), then answers the parent's commands, one JSON line each, until stdin ends."""
    from prometheus_client import CollectorRegistry

    allow_open_files(2 * (end - first) * count + 1024)  # each node may dial, and be dialled by, every other

    mine = identities(seed, count)[first:end]
    registries = [CollectorRegistry() for _ in mine]
    # every node's address is on 127.0.0.1, which the per-peer limits take for one peer (a host):
    # here they would refuse the whole swarm's calls to a busy node as one peer's flood
    wire = WireSettings(listen_host="127.0.0.1", bulk=False, tls=tls, max_requests_per_second=1e6, request_burst=10**6,
                        max_concurrent_per_peer=10**5, max_tracked_peers=10**5)
    clock = slowed(time_scale, origin)  # (at 1, the real clock's pace)
    nodes: list[DHTNode] = []
    if not initial:
        nodes.append(await DHTNode.launch([], identity=mine[0], registry=registries[0], wire=wire, clock=clock))
        initial = nodes[0].address
    for start in range(len(nodes), len(mine), JOIN_BATCH):
        nodes += await asyncio.gather(*(DHTNode.launch([PeerAddress.parse(initial)], identity=identity, registry=registry,
                                                       wire=wire, clock=clock)
                                        for identity, registry in zip(mine[start:start + JOIN_BATCH],
                                                                      registries[start:start + JOIN_BATCH])))
    peers = Peers([ProgressTracker(node, "sockets", node.identity.peer_id, clock=clock) for node in nodes],
                  throughputs(seed, count)[first:end], at_once)
    print(json.dumps({"address": nodes[0].address}), flush=True)

    def counted() -> tuple[list[Counter[str]], Counter[str]]:
        """The bytes each node served by method, and the calls they all served by method."""
        found, calls = [], Counter[str]()
        for registry in registries:
            node = Counter[str]()
            for family in registry.collect():
                for sample in family.samples:
                    if family.name in ("apiary_dht_rpc_received_bytes", "apiary_dht_rpc_sent_bytes") \
                            and sample.name.endswith("_total"):
                        node[sample.labels["method"]] += sample.value
                    elif family.name == "apiary_dht_rpc_requests" and sample.name.endswith("_total"):
                        calls[sample.labels["method"]] += sample.value
            found.append(node)
        return found, calls

    baseline = counted()
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            command = json.loads(line)
            if command["op"] == "publish":
                answer: Any = await peers.publish(command["epoch"], command["seconds"])
            elif command["op"] == "fetch":
                answer = await peers.fetch(command["aggregators_only"])
            elif command["op"] == "reset":
                baseline, answer = counted(), True
            else:  # served
                served, calls = counted()
                answer = [[dict(now - base) for now, base in zip(served, baseline[0])], dict(calls - baseline[1])]
            print(json.dumps(answer), flush=True)
    finally:
        await asyncio.gather(*(node.shutdown() for node in nodes))


async def over_sockets(peers: int, workers: int, seed: int, tls: bool, at_once: int, time_scale: float,
                       rounds: int) -> dict[str, Any]:
    group = OverSockets(peers, workers, seed, tls, at_once, time_scale)
    try:
        await group.start()
        return await scenario(group, peers, rounds)
    finally:
        await group.close()


def simulated(peers: int, seed: int, rounds: int) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        group = Simulated(peers, seed)
        await group.start()
        try:
            return await scenario(group, peers, rounds)
        finally:
            await group.close()

    return run(main(), seed)


def compare(peers: int, workers: int, seed: int, *, tls: bool = False, at_once: int = AT_ONCE,
            time_scale: float = 1.0, rounds: int = PROBE_EVERY) -> dict[str, Any]:
    """The scenario (`rounds` unmeasured refresh rounds) on real sockets (at most `at_once` peers
    calling at once, their clocks `time_scale` times slower than real), then in the simulator."""
    started = time.monotonic()
    real = asyncio.run(over_sockets(peers, workers, seed, tls, at_once, time_scale, rounds))
    log(f"sockets: {peers} peers measured in {time.monotonic() - started:.0f} s")
    sim = simulated(peers, seed, rounds)
    ratios = {"served_per_peer": real["served_per_peer"] / sim["served_per_peer"],
              "served_busiest": real["served_busiest"] / sim["served_busiest"]}
    return {"peers": peers, "workers": workers, "tls": tls, "at_once": at_once, "time_scale": time_scale, "rounds": rounds, "sockets": real, "simulator": sim, "sockets_over_simulator": ratios,
            "seconds": round(time.monotonic() - started, 1)}


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        asyncio.run(worker(**json.loads(sys.argv[2])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tls", action="store_true", help="TLS between the nodes (the same bytes; far more CPU)")
    parser.add_argument("--at-once", type=int, default=AT_ONCE,
                        help="peers writing or reading at once, in the whole swarm (on sockets, each process its share)")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="the real nodes' clocks run this many times slower (a machine too slow for the round to "
                             "end while sums are fresh: records expire and sums go stale in the clocks' time)")
    parser.add_argument("--rounds", type=int, default=PROBE_EVERY,
                        help="refresh rounds before the measured one (PROBE_EVERY: every member of a shard has probed it, "
                             "and its aggregators know their role, whatever the order of the calls)")
    args = parser.parse_args()
    result = compare(args.peers, args.workers, args.seed, tls=args.tls, at_once=args.at_once, time_scale=args.time_scale,
                     rounds=args.rounds)
    for side in ("sockets", "simulator"):
        f = result[side]
        print(f"{side:9}: per peer {f['served_per_peer'] / 1e3:.1f} kB, busiest node {f['served_busiest'] / 1e3:.1f} kB "
              f"served in the round ({ {m: round(v / 1e3, 1) for m, v in f['served_per_peer_by_method'].items()} } kB "
              f"per peer, in { {m: round(v, 1) for m, v in f['calls_per_peer_by_method'].items()} } calls); "
              f"counted {f['counted_peers']} peers at {f['shards']} shards; {f['aggregators']} aggregators")
    ratios = result["sockets_over_simulator"]
    print(f"sockets / simulator: per peer {ratios['served_per_peer']:.2f}, busiest node {ratios['served_busiest']:.2f}")
    if result["sockets"]["round_seconds"] / args.time_scale > MAX_AGE:
        print(f"the real round took {result['sockets']['round_seconds']:.0f} s, past the {MAX_AGE:.0f} s a shard's sum stays "
              f"fresh in the nodes' time (records live {ProgressTracker.ttl:.0f} s): too slow for {args.peers} real nodes here, "
              f"whose readers fell back to reading shards whole; try a larger --time-scale")
    save("scale-sockets", result)


if __name__ == "__main__":
    main()

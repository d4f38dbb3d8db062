"""A DHT swarm under churn: store and get success, latency and memory.

Launches N DHT nodes in this process (real gRPC over loopback, one event loop), each joining
through a random earlier node, plus one standalone `apiary dht` process started from the CLI
that joins through a random node and takes part like any other. Then, for each round:
  1. K stores of fresh keys, each from a random live node (default 5 replicas);
  2. a fraction of the live in-process nodes dies without goodbye (its server stops at once,
     its background tasks are cancelled; the CLI process is never killed);
  3. every key stored so far is read from a random surviving node.
Prints per round and in total: store and get success rates, store/get latency p50/p99, the
get success against the 99.9% target, the peak RSS of this process (ru_maxrss) and the RSS of
the standalone `apiary dht` process (/proc/PID/status VmRSS) against its 150 MB budget.

Usage: python benchmarks/dht.py [--nodes 64] [--rounds 3] [--keys 100] [--kill 0.1]
                                [--concurrency 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from measure import percentile, rate
from record import save

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC logs every GOAWAY of a killed node at INFO

GET_TARGET = 0.999
RSS_BUDGET_MB = 150.0


@dataclass
class Round:
    stores: list[tuple[bool, float]] = field(default_factory=list)
    gets: list[tuple[bool, float]] = field(default_factory=list)
    gets_this_round: list[bool] = field(default_factory=list)
    killed: int = 0
    alive: int = 0


async def bounded(concurrency: int, jobs: list[Any]) -> list[Any]:
    semaphore = asyncio.Semaphore(concurrency)

    async def run(job: Any) -> Any:
        async with semaphore:
            return await job

    return await asyncio.gather(*(run(job) for job in jobs))


def start_cli_node(initial_peers: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "apiary.cli.main", "dht", "--plaintext", "--host", "127.0.0.1", "--port", "0",
         "--initial-peers", initial_peers],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "400"},
    )
    output = ""
    assert process.stdout is not None
    while "local API:" not in output:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"apiary dht did not start: {output}{process.stderr.read() if process.stderr else ''}")
        output += line
    address = re.search(r"--initial-peers (\S+)", output)
    return process, address.group(1) if address else ""


def vm_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MB."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) / 1024
    return values


async def main(args: argparse.Namespace) -> None:
    from apiary.dht import DHTNode
    from apiary.wire import PeerAddress, WireSettings

    rng = random.Random(args.seed)
    wire = WireSettings(listen_host="127.0.0.1", bulk=False, tls=False)  # plaintext, as the figures in docs/benchmarks.md
    started = time.perf_counter()
    nodes: list[DHTNode] = [await DHTNode.launch(wire=wire)]
    for _ in range(args.nodes - 1):
        entry = rng.choice(nodes)
        nodes.append(await DHTNode.launch([PeerAddress.parse(entry.address)], wire=wire))
    launch_seconds = time.perf_counter() - started
    routing_sizes = [len(node.routing) for node in nodes]
    print(f"{args.nodes} nodes up in {launch_seconds:.1f}s; routing table sizes: "
          f"min {min(routing_sizes)}, median {statistics.median(routing_sizes):.0f}, max {max(routing_sizes)}",
          flush=True)

    loop = asyncio.get_running_loop()
    cli, cli_address = await loop.run_in_executor(None, start_cli_node, rng.choice(nodes).address)
    try:
        await asyncio.sleep(1.0)
        cli_joined = vm_status(cli.pid)
        rounds = await run_rounds(args, rng, nodes)
        cli_after = vm_status(cli.pid)
    finally:
        cli.send_signal(signal.SIGTERM)
        try:
            cli_code = await loop.run_in_executor(None, cli.wait, 15)
        except subprocess.TimeoutExpired:
            cli.kill()
            cli_code = cli.wait()
    await asyncio.gather(*(node.shutdown() for node in nodes), return_exceptions=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report(args, rounds, peak_mb, cli_joined, cli_after, cli_code, time.perf_counter() - started)


async def run_rounds(args: argparse.Namespace, rng: random.Random, nodes: list[Any]) -> list[Round]:
    alive = list(nodes)
    stored: dict[str, int] = {}
    rounds = []
    for number in range(args.rounds):
        this = Round()
        expiration = time.time() + 3600
        fresh = {f"round{number}-key{i}-{rng.getrandbits(32):08x}": rng.getrandbits(62) for i in range(args.keys)}

        async def store(key: str, value: int) -> tuple[bool, float]:
            node, began = rng.choice(alive), time.perf_counter()
            try:
                ok = await node.store(key, value, expiration)
            except Exception as e:  # noqa: BLE001 - a failed store is a data point
                print(f"store {key} failed: {type(e).__name__}: {e}", file=sys.stderr)
                ok = False
            return ok, time.perf_counter() - began

        this.stores = await bounded(args.concurrency, [store(k, v) for k, v in fresh.items()])
        stored.update({k: v for (k, v), (ok, _) in zip(fresh.items(), this.stores) if ok})

        victims = rng.sample(alive, int(round(args.kill * len(alive))))
        await asyncio.gather(*(node.shutdown() for node in victims))
        alive = [node for node in alive if node not in victims]
        this.killed, this.alive = len(victims), len(alive)

        async def get(key: str, value: int) -> tuple[bool, float]:
            node, began = rng.choice(alive), time.perf_counter()
            try:
                found = await node.get(key)
            except Exception as e:  # noqa: BLE001
                print(f"get {key} failed: {type(e).__name__}: {e}", file=sys.stderr)
                found = None
            return found is not None and found.value == value, time.perf_counter() - began

        this.gets = await bounded(args.concurrency, [get(k, v) for k, v in stored.items()])
        this.gets_this_round = [ok for key, (ok, _) in zip(stored, this.gets) if key in fresh]
        rounds.append(this)
        print(f"round {number + 1}: {rate([ok for ok, _ in this.stores]):.1%} stored, killed {this.killed} "
              f"({this.alive} left), {rate([ok for ok, _ in this.gets]):.2%} of {len(this.gets)} keys found",
              flush=True)
    return rounds


def report(args: argparse.Namespace, rounds: list[Round], peak_mb: float, cli_joined: dict[str, float],
           cli_after: dict[str, float], cli_code: int, seconds: float) -> None:
    rows = [("round", "stores ok", "store p50", "store p99", "killed/left", "gets ok (all keys)",
             "gets ok (this round)", "get p50", "get p99")]
    for number, r in enumerate(rounds, 1):
        rows.append(row(str(number), r.stores, r.gets, f"{r.killed}/{r.alive}", rate(r.gets_this_round)))
    all_stores = [s for r in rounds for s in r.stores]
    all_gets = [g for r in rounds for g in r.gets]
    rows.append(row("all", all_stores, all_gets, f"{sum(r.killed for r in rounds)}/{rounds[-1].alive}",
                    rate([ok for r in rounds for ok in r.gets_this_round])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    print(f"apiary DHT: {args.nodes} nodes in one process + 1 `apiary dht` process, {args.rounds} rounds of "
          f"{args.keys} stores, {args.kill:.0%} killed per round, concurrency {args.concurrency}")
    for r in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(r, widths)))
    get_rate = rate([ok for ok, _ in all_gets])
    fresh_rate = rate([ok for r in rounds for ok in r.gets_this_round])
    print()
    print(f"get success (all reads, cumulative keys): {get_rate:.2%} = {get_rate / GET_TARGET:.3f} x the "
          f"{GET_TARGET:.1%} target")
    print(f"get success (reads of the round's own keys): {fresh_rate:.2%} = {fresh_rate / GET_TARGET:.3f} x target")
    print(f"peak RSS of this process: {peak_mb:.0f} MB ({peak_mb / args.nodes:.1f} MB per in-process node)")
    print(f"standalone `apiary dht` RSS: {cli_joined.get('VmRSS', 0):.0f} MB after joining, "
          f"{cli_after.get('VmRSS', 0):.0f} MB (peak {cli_after.get('VmHWM', 0):.0f} MB) after the rounds, "
          f"vs the {RSS_BUDGET_MB:.0f} MB budget: {cli_after.get('VmHWM', 0) / RSS_BUDGET_MB:.2f} x; "
          f"exit code on SIGTERM {cli_code}")
    print(f"total time {seconds:.0f}s")
    save("dht", {
        "nodes": args.nodes, "rounds": args.rounds, "keys": args.keys, "kill": args.kill,
        "concurrency": args.concurrency, "seed": args.seed,
        "per_round": [figures(r.stores, r.gets) | {"killed": r.killed, "left": r.alive} for r in rounds],
        "all": figures(all_stores, all_gets), "get_target": GET_TARGET, "peak_rss_mb": peak_mb,
        "cli_rss_mb": {"joined": cli_joined.get("VmRSS"), "after": cli_after.get("VmRSS"),
                       "peak": cli_after.get("VmHWM")},
        "rss_budget_mb": RSS_BUDGET_MB, "seconds": seconds,
    }, preset=None if args.nodes == 64 else f"{args.nodes}-nodes")


def figures(stores: list[tuple[bool, float]], gets: list[tuple[bool, float]]) -> dict[str, float]:
    """Success rates, counts and latency percentiles (ms) of some stores and gets."""
    store_ms, get_ms = [t * 1000 for _, t in stores], [t * 1000 for _, t in gets]
    return {"stores": len(stores), "stores_ok": rate([ok for ok, _ in stores]),
            "store_p50_ms": percentile(store_ms, 0.5), "store_p99_ms": percentile(store_ms, 0.99),
            "gets": len(gets), "gets_ok": rate([ok for ok, _ in gets]),
            "get_p50_ms": percentile(get_ms, 0.5), "get_p99_ms": percentile(get_ms, 0.99)}


def row(name: str, stores: list[tuple[bool, float]], gets: list[tuple[bool, float]], churn: str,
        fresh_rate: float) -> tuple[str, ...]:
    store_ms = [t * 1000 for _, t in stores]
    get_ms = [t * 1000 for _, t in gets]
    return (
        name,
        f"{rate([ok for ok, _ in stores]):.1%}",
        f"{percentile(store_ms, 0.5):.0f} ms",
        f"{percentile(store_ms, 0.99):.0f} ms",
        churn,
        f"{rate([ok for ok, _ in gets]):.2%} of {len(gets)}",
        f"{fresh_rate:.2%}",
        f"{percentile(get_ms, 0.5):.0f} ms",
        f"{percentile(get_ms, 0.99):.0f} ms",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keys", type=int, default=100, help="stores per round")
    parser.add_argument("--kill", type=float, default=0.1, help="fraction of live nodes killed per round")
    parser.add_argument("--concurrency", type=int, default=8, help="operations in flight at once")
    parser.add_argument("--seed", type=int, default=0)
    asyncio.run(main(parser.parse_args()))

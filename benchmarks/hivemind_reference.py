"""Reference figures from the real hivemind library, measured the way our own benchmarks measure.

This script does NOT run in the project's environment: it imports hivemind (and torch) from a
separate virtual environment and never imports apiary. Set that environment up once with:

    python3 -m venv /tmp/hivemind-venv
    /tmp/hivemind-venv/bin/pip install torch==2.13.0      # first: the local CPU wheel, no CUDA build
    /tmp/hivemind-venv/bin/pip install hivemind==1.1.12   # its wheel bundles the p2pd binary
    /tmp/hivemind-venv/bin/python -c "import hivemind; hivemind.DHT(start=True).shutdown()"

and run it with that environment's python:

    /tmp/hivemind-venv/bin/python benchmarks/hivemind_reference.py dht [--nodes 16] [--rounds 1]
    /tmp/hivemind-venv/bin/python benchmarks/hivemind_reference.py averaging [--numel 10000000]
    /tmp/hivemind-venv/bin/python benchmarks/hivemind_reference.py moe [--hidden 64 --grid 4x4 --k 2 --batch 512]
    /tmp/hivemind-venv/bin/python benchmarks/hivemind_reference.py all

Parts (loopback only, 127.0.0.1):

dht        - the counterpart of benchmarks/dht.py. N hivemind DHT nodes, each joining through a
             random earlier node's visible multiaddrs. In the default --mode process each node is a
             hivemind.DHT: its own Python process *and* its own p2pd daemon process, so N costs 2N
             processes; keep N modest (default 16). --mode node runs hivemind.dht.DHTNode objects in
             this process on one event loop (closer to benchmarks/dht.py, which runs all its nodes in
             one process), though every node still has its own p2pd daemon. Per round: K stores of
             fresh keys (expiration now + 600 s) from random live nodes, a fraction of the live nodes
             shut down, then every key stored so far is read from a random survivor. Concurrency 8,
             as in benchmarks/dht.py. Prints store/get success and p50/p99 latency, and the memory
             of this process plus all its descendants (DHT processes, p2pd daemons): RSS summed
             (double-counts pages shared after fork) and PSS summed (shares them out).
averaging  - the counterpart of benchmarks/averaging.py. 4 peer processes (multiprocessing spawn),
             each with its own hivemind.DHT (and p2pd) and a hivemind.averaging.DecentralizedAverager
             over one float32 tensor of --numel elements, target_group_size=4. In the same run:
               raw      - each peer sends 2 * numel*4/peers bytes to every other peer over plain TCP
                          sockets, all at once (the bytes a butterfly all-reduce moves): the bound;
               step     - averager.step() started by all peers at the same instant: the time step()
                          takes, which INCLUDES matchmaking (DHT declare/lookup, join requests);
               trigger  - averager.step(wait=False, require_trigger=True): matchmaking is done first,
                          then all peers call allow_allreduce() at the same instant and the time to
                          the result is the all-reduce alone (group setup + data), closest to what
                          benchmarks/averaging.py times (it runs a given group, no matchmaking).
             once per codec (NoCompression, Float16Compression), after a warm-up step each, median
             of --repeats; a round's time is the slowest peer's. Prints bound/round.
moe        - the counterpart of benchmarks/moe_layer.py, run in the same invocation: --servers
             `hivemind-server` processes (its CLI; `background_server` has been seen to hang at
             start here) host the grid <prefix>.[0:rows].[0:columns] of `ffn` experts of --hidden
             size, one row range each, joined to a hivemind.DHT of this process; hivemind's
             RemoteMixtureOfExperts (k_best --k) on a [--batch, --hidden] input, forward +
             backward, median samples/s of --steps after --warmup. Then benchmarks/moe_layer.py
             measures apiary's RemoteMixtureOfExperts on the same layer from the project's
             environment (--apiary-python, default .venv/bin/python: a subprocess, so this script
             still never imports apiary). Both figures go into results/hivemind-moe.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from measure import percentile, rate, raw_exchange
from moe_layer import arguments as layer_arguments, row_ranges, timed_steps
from record import ROOT, save

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


# ---------------------------------------------------------------------------------------------
# helpers


def descendants(pid: int) -> list[int]:
    """pid and all its live descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def tree_memory(pid: int) -> dict[str, float]:
    """RSS and PSS summed over pid and its descendants (MB), and the process counts by name."""
    try:
        import psutil  # optional
    except ImportError:
        psutil = None
    rss = pss = 0.0
    names: dict[str, int] = {}
    by_name: dict[str, list[float]] = {}  # name -> [rss, pss]
    for p in descendants(pid):
        one_rss = one_pss = 0.0
        try:
            if psutil is not None:
                info = psutil.Process(p).memory_full_info()
                one_rss, one_pss = info.rss / 2**20, getattr(info, "pss", info.rss) / 2**20
                name = psutil.Process(p).name()
            else:
                with open(f"/proc/{p}/smaps_rollup") as smaps:
                    for line in smaps:
                        key, _, rest = line.partition(":")
                        if key == "Rss":
                            one_rss += int(rest.split()[0]) / 1024
                        elif key == "Pss":
                            one_pss += int(rest.split()[0]) / 1024
                with open(f"/proc/{p}/comm") as comm:
                    name = comm.read().strip()
        except Exception:  # noqa: BLE001 - a process that just exited
            continue
        name = "this process" if p == pid else name
        rss, pss = rss + one_rss, pss + one_pss
        names[name] = names.get(name, 0) + 1
        totals = by_name.setdefault(name, [0.0, 0.0])
        totals[0] += one_rss
        totals[1] += one_pss
    return {"rss": rss, "pss": pss, "processes": sum(names.values()), "names": names, "by_name": by_name}


def memory_line(memory: dict[str, Any]) -> str:
    parts = "; ".join(
        f"{count} x {name}: RSS {memory['by_name'][name][0] / count:.0f} / "
        f"PSS {memory['by_name'][name][1] / count:.0f} MB each"
        for name, count in sorted(memory["names"].items()))
    return (f"RSS sum {memory['rss']:.0f} MB, PSS sum {memory['pss']:.0f} MB over "
            f"{memory['processes']} processes ({parts})")


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(r, widths)))


# ---------------------------------------------------------------------------------------------
# part a: DHT


class ProcessNodes:
    """hivemind.DHT nodes: one Python process plus one p2pd daemon each. Calls from a thread pool;
    a per-node lock keeps two threads from writing to the same node's control pipe at once."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.locks: list[threading.Lock] = []

    def launch(self, initial_peers: list[str]) -> int:
        import hivemind

        self.nodes.append(hivemind.DHT(initial_peers=initial_peers or None, host_maddrs=LOOPBACK, start=True))
        self.locks.append(threading.Lock())
        return len(self.nodes) - 1

    def maddrs(self, index: int) -> list[str]:
        return [str(m) for m in self.nodes[index].get_visible_maddrs()]

    def store(self, index: int, key: str, value: int, expiration: float, timeout: float) -> bool:
        with self.locks[index]:
            future = self.nodes[index].store(key, value, expiration_time=expiration, return_future=True)
        return bool(future.result(timeout=timeout))

    def get(self, index: int, key: str, timeout: float) -> Any:
        with self.locks[index]:
            future = self.nodes[index].get(key, return_future=True)
        return future.result(timeout=timeout)

    def shutdown(self, index: int) -> None:
        self.nodes[index].shutdown()


class LoopNodes:
    """hivemind.dht.DHTNode objects on one event loop in this process (each still has a p2pd)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.nodes: list[Any] = []

    def _run(self, coroutine: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def launch(self, initial_peers: list[str]) -> int:
        from hivemind.dht.node import DHTNode

        self.nodes.append(self._run(DHTNode.create(initial_peers=initial_peers or None, host_maddrs=LOOPBACK)))
        return len(self.nodes) - 1

    def maddrs(self, index: int) -> list[str]:
        return [str(m) for m in self._run(self.nodes[index].get_visible_maddrs())]

    def store(self, index: int, key: str, value: int, expiration: float, timeout: float) -> bool:
        return bool(self._run(self.nodes[index].store(key, value, expiration), timeout))

    def get(self, index: int, key: str, timeout: float) -> Any:
        return self._run(self.nodes[index].get(key), timeout)

    def shutdown(self, index: int) -> None:
        self._run(self.nodes[index].shutdown(), 30)


def timed_pool(concurrency: int, jobs: list[Callable[[], bool]]) -> list[tuple[bool, float]]:
    """Runs the jobs with at most `concurrency` in flight; (ok, seconds) per job, in order."""
    from concurrent.futures import ThreadPoolExecutor

    def timed(job: Callable[[], bool]) -> tuple[bool, float]:
        began = time.perf_counter()
        try:
            ok = job()
        except Exception as e:  # noqa: BLE001 - a failed operation is a data point
            print(f"  operation failed: {type(e).__name__}: {e}", file=sys.stderr)
            ok = False
        return ok, time.perf_counter() - began

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(timed, jobs))


def dht_part(args: argparse.Namespace) -> None:
    import hivemind
    from hivemind.utils.timed_storage import get_dht_time

    layout = ("a hivemind.DHT process + a p2pd daemon per node" if args.mode == "process"
              else "DHTNode objects on one event loop in this process + a p2pd daemon per node")
    print(f"hivemind {hivemind.__version__}, DHT part: {args.nodes} nodes, mode {args.mode} ({layout})", flush=True)
    rng = random.Random(args.seed)
    started = time.perf_counter()
    nodes = ProcessNodes() if args.mode == "process" else LoopNodes()
    maddrs: list[list[str]] = []
    for i in range(args.nodes):
        entry = rng.sample(range(len(maddrs)), min(args.join_through, len(maddrs)))
        index = nodes.launch([m for j in entry for m in maddrs[j]])
        maddrs.append(nodes.maddrs(index))
    launch_seconds = time.perf_counter() - started
    print(f"{args.nodes} nodes up in {launch_seconds:.1f}s", flush=True)
    memory_up = tree_memory(os.getpid())

    alive = list(range(args.nodes))
    stored: dict[str, int] = {}
    rows: list[tuple[str, ...]] = [("round", "stores ok", "store p50", "store p99", "killed/left",
                                    "gets ok (all keys)", "gets ok (this round)", "get p50", "get p99")]
    all_stores: list[tuple[bool, float]] = []
    all_gets: list[tuple[bool, float]] = []
    all_fresh: list[bool] = []
    memory_stored = memory_up
    for number in range(args.rounds):
        expiration = get_dht_time() + 600
        fresh = {f"round{number}-key{i}-{rng.getrandbits(32):08x}": rng.getrandbits(62) for i in range(args.keys)}
        def store_job(key: str, value: int, node: int, expiration: float = expiration) -> Callable[[], bool]:
            return lambda: nodes.store(node, key, value, expiration, args.timeout)

        stores = timed_pool(args.concurrency, [store_job(k, v, rng.choice(alive)) for k, v in fresh.items()])
        stored.update({k: v for (k, v), (ok, _) in zip(fresh.items(), stores) if ok})
        if number == 0:
            memory_stored = tree_memory(os.getpid())

        victims = rng.sample(alive, round(args.kill * len(alive)))
        for victim in victims:
            nodes.shutdown(victim)
        alive = [n for n in alive if n not in victims]

        def get_job(key: str, value: int, node: int) -> Callable[[], bool]:
            def job() -> bool:
                found = nodes.get(node, key, args.timeout)
                return found is not None and found.value == value
            return job

        gets = timed_pool(args.concurrency, [get_job(k, v, rng.choice(alive)) for k, v in stored.items()])
        fresh_ok = [ok for key, (ok, _) in zip(stored, gets) if key in fresh]
        all_stores += stores
        all_gets += gets
        all_fresh += fresh_ok
        print(f"round {number + 1}: {rate([ok for ok, _ in stores]):.1%} stored, killed {len(victims)} "
              f"({len(alive)} left), {rate([ok for ok, _ in gets]):.2%} of {len(gets)} keys found", flush=True)
        rows.append(dht_row(str(number + 1), stores, gets, f"{len(victims)}/{len(alive)}", rate(fresh_ok)))
    rows.append(dht_row("all", all_stores, all_gets, f"{args.nodes - len(alive)}/{len(alive)}", rate(all_fresh)))
    memory_end = tree_memory(os.getpid())

    print()
    print(f"hivemind {hivemind.__version__} DHT, {args.nodes} nodes (mode {args.mode}), {args.rounds} round(s) of "
          f"{args.keys} stores, {args.kill:.0%} shut down per round, concurrency {args.concurrency}, "
          f"num_replicas 5 (hivemind default), get(latest=False)")
    print_table(rows)
    print()
    print(f"memory, all nodes up:           {memory_line(memory_up)}")
    print(f"memory, after round 1's stores: {memory_line(memory_stored)}")
    print(f"memory, at the end:             {memory_line(memory_end)}")
    print(f"  per node (PSS after round 1's stores / {args.nodes}): {memory_stored['pss'] / args.nodes:.0f} MB")
    store_ms, get_ms = [t * 1000 for _, t in all_stores], [t * 1000 for _, t in all_gets]
    save("hivemind", {
        "version": hivemind.__version__, "nodes": args.nodes, "mode": args.mode, "rounds": args.rounds,
        "keys": args.keys, "kill": args.kill, "stores_ok": rate([ok for ok, _ in all_stores]),
        "store_p50_ms": percentile(store_ms, 0.5), "store_p99_ms": percentile(store_ms, 0.99),
        "gets": len(all_gets), "gets_ok": rate([ok for ok, _ in all_gets]),
        "get_p50_ms": percentile(get_ms, 0.5), "get_p99_ms": percentile(get_ms, 0.99),
        "memory_mb": {"up": memory_up, "stored": memory_stored, "end": memory_end}}, preset="dht")
    print(f"total time {time.perf_counter() - started:.0f}s", flush=True)
    for n in alive:
        try:
            nodes.shutdown(n)
        except Exception:  # noqa: BLE001
            pass


def dht_row(name: str, stores: list[tuple[bool, float]], gets: list[tuple[bool, float]], churn: str,
            fresh_rate: float) -> tuple[str, ...]:
    store_ms = [t * 1000 for _, t in stores]
    get_ms = [t * 1000 for _, t in gets]
    return (name, f"{rate([ok for ok, _ in stores]):.1%}", f"{percentile(store_ms, 0.5):.0f} ms",
            f"{percentile(store_ms, 0.99):.0f} ms", churn, f"{rate([ok for ok, _ in gets]):.2%} of {len(gets)}",
            f"{fresh_rate:.2%}", f"{percentile(get_ms, 0.5):.0f} ms", f"{percentile(get_ms, 0.99):.0f} ms")


# ---------------------------------------------------------------------------------------------
# part b: averaging


def averaging_worker(index: int, numel: int, initial_peers: list[str], conn: Any, threads: int,
                     min_matchmaking_time: float) -> None:
    """One peer: its own hivemind.DHT (+ p2pd), a DecentralizedAverager per codec, a raw socket."""
    import hivemind
    import torch
    from hivemind.averaging import DecentralizedAverager
    from hivemind.averaging.control import AveragingStage
    from hivemind.compression import Float16Compression, NoCompression

    # this process was spawned, which makes "spawn" its default start method; DecentralizedAverager is a
    # plain mp.Process and needs hivemind's usual "fork" (hivemind.DHT is a ForkProcess either way)
    mp.set_start_method("fork", force=True)
    torch.set_num_threads(threads)
    dht = hivemind.DHT(initial_peers=initial_peers, host_maddrs=LOOPBACK, start=True)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    conn.send({"raw": listener.getsockname()[1]})
    tensor = torch.empty(numel)
    averager = control = None
    sinks: dict[int, memoryview] = {}
    codecs = {"none": NoCompression(), "float16": Float16Compression()}
    while True:
        command = conn.recv()
        what = command["what"]
        if what == "stop":
            break
        if "start" in command:
            time.sleep(max(0.0, command["start"] - time.time()))
        began = time.perf_counter()
        reply: dict[str, Any] = {}
        try:
            if what == "raw":
                reply["elapsed"] = asyncio.run(raw_exchange(index, command["raw_ports"], listener,
                                                            command["nbytes"], sinks))
            elif what == "setup":
                if averager is not None:
                    averager.shutdown()
                generator = torch.Generator().manual_seed(1000 * command["seed"] + index)
                tensor = torch.randn(numel, generator=generator)
                reply["head"] = tensor[:1000].tolist()
                averager = DecentralizedAverager(
                    [tensor], dht, start=True, prefix=f"bench_{command['codec']}", target_group_size=command["peers"],
                    min_group_size=command["peers"], min_matchmaking_time=min_matchmaking_time,
                    compression=codecs[command["codec"]])
                reply["elapsed"] = time.perf_counter() - began
            elif what == "step":
                result = averager.step(timeout=command["timeout"])
                reply["elapsed"] = time.perf_counter() - began
                reply["group"] = len(result) if result else 0
            elif what == "arm":
                control = averager.step(wait=False, require_trigger=True, timeout=command["timeout"])
                while control.stage != AveragingStage.AWAITING_TRIGGER and not control.done():
                    time.sleep(0.001)
                reply["elapsed"] = time.perf_counter() - began
                reply["ready"] = control.stage == AveragingStage.AWAITING_TRIGGER
            elif what == "trigger":
                control.allow_allreduce()
                result = control.result()
                reply["elapsed"] = time.perf_counter() - began
                reply["group"] = len(result) if result else 0
            if what in ("step", "trigger"):
                with averager.get_tensors() as tensors:
                    reply["head"] = tensors[0][:1000].tolist()
        except Exception as e:  # noqa: BLE001 - reported to the parent
            reply["elapsed"] = time.perf_counter() - began
            reply["error"] = f"{type(e).__name__}: {e}"
            reply["group"] = 0
        conn.send(reply)
    if averager is not None:
        averager.shutdown()
    dht.shutdown()


def averaging_part(args: argparse.Namespace) -> None:
    import hivemind

    print(f"hivemind {hivemind.__version__}, averaging part: {args.peers} peers, {args.numel:,} float32 "
          f"({args.numel * 4 / 1e6:.0f} MB each), codecs {args.codecs}", flush=True)
    started_all = time.perf_counter()
    bootstrap = hivemind.DHT(host_maddrs=LOOPBACK, start=True)
    initial_peers = [str(m) for m in bootstrap.get_visible_maddrs()]
    context = mp.get_context("spawn")
    pipes, workers = [], []
    for i in range(args.peers):
        parent_end, child_end = context.Pipe()
        worker = context.Process(target=averaging_worker, daemon=False,
                                 args=(i, args.numel, initial_peers, child_end, args.threads,
                                       args.min_matchmaking_time))
        worker.start()
        pipes.append(parent_end)
        workers.append(worker)
    try:
        infos = [p.recv() for p in pipes]
        raw_ports = [info["raw"] for info in infos]
        print(f"{args.peers} peers up in {time.perf_counter() - started_all:.1f}s", flush=True)

        def run(what: str, synchronized: bool = True, **extra: Any) -> list[dict[str, Any]]:
            command = {"what": what, **extra}
            if synchronized:
                command["start"] = time.time() + 0.5
            for p in pipes:
                p.send(command)
            replies = [p.recv() for p in pipes]
            for i, r in enumerate(replies):
                if "error" in r:
                    print(f"  peer {i} {what}: {r['error']}", file=sys.stderr, flush=True)
            return replies

        def slowest(replies: list[dict[str, Any]]) -> float:
            return max(r["elapsed"] for r in replies)

        part_bytes = args.numel * 4 // args.peers
        raws = [slowest(run("raw", raw_ports=raw_ports, nbytes=2 * part_bytes)) for _ in range(args.repeats)]
        raw = statistics.median(raws)
        print(f"raw-socket exchange: {', '.join(f'{t:.2f}' for t in raws)} s", flush=True)

        results: dict[str, dict[str, Any]] = {}
        for seed, codec in enumerate(args.codecs.split(",")):
            heads = [r["head"] for r in run("setup", synchronized=False, codec=codec, seed=seed, peers=args.peers)]
            expected = [sum(column) / len(column) for column in zip(*heads)]
            warm = run("step", timeout=args.timeout)  # warm-up: connections, buffers, first matchmaking
            error = max((max(abs(a - b) for a, b in zip(r.get("head", expected), expected)) for r in warm),
                        default=float("nan"))
            groups = [r["group"] for r in warm]
            print(f"{codec}: warm-up step {slowest(warm):.2f} s, group sizes {groups}, "
                  f"max |result - mean| over the first 1000 values {error:.2e}", flush=True)
            steps, arms, triggers, failures = [], [], [], 0
            for _ in range(args.repeats):
                replies = run("step", timeout=args.timeout)
                failures += sum(r["group"] != args.peers for r in replies)
                steps.append(slowest(replies))
            for _ in range(args.repeats):
                armed = run("arm", timeout=args.timeout)
                arms.append(slowest(armed))
                replies = run("trigger")
                failures += sum(r["group"] != args.peers for r in replies)
                triggers.append(slowest(replies))
            print(f"{codec}: step() {', '.join(f'{t:.2f}' for t in steps)} s; matchmaking "
                  f"{', '.join(f'{t:.2f}' for t in arms)} s; triggered all-reduce "
                  f"{', '.join(f'{t:.2f}' for t in triggers)} s; failed peer-steps {failures}", flush=True)
            results[codec] = {"step": statistics.median(steps), "arm": statistics.median(arms),
                              "trigger": statistics.median(triggers), "failures": failures}
    finally:
        for p in pipes:
            try:
                p.send({"what": "stop"})
            except OSError:
                pass
        for w in workers:
            w.join(timeout=60)
            if w.is_alive():
                w.kill()
        bootstrap.shutdown()

    print()
    print(f"hivemind {hivemind.__version__} DecentralizedAverager, {args.peers} peers, {args.numel:,} float32 "
          f"({args.numel * 4 / 1e6:.0f} MB each), loopback, target_group_size {args.peers}, "
          f"torch threads per peer {args.threads}, median of {args.repeats} after a warm-up step")
    print(f"raw-socket bound (each peer sends 2 x {part_bytes / 1e6:.0f} MB to each other peer at once): {raw:7.2f} s")
    rows = [("codec", "step() incl. matchmaking", "bound/step", "matchmaking alone", "all-reduce after trigger",
             "bound/all-reduce", "failed peer-steps")]
    for codec, r in results.items():
        rows.append((codec, f"{r['step']:.2f} s", f"{raw / r['step']:.2f}", f"{r['arm']:.2f} s",
                     f"{r['trigger']:.2f} s", f"{raw / r['trigger']:.2f}", str(r["failures"])))
    print_table(rows)
    print(f"total time {time.perf_counter() - started_all:.0f}s", flush=True)
    save("hivemind", {"version": hivemind.__version__, "peers": args.peers, "numel": args.numel,
                      "repeats": args.repeats, "raw_seconds": raw, "codecs": results}, preset="averaging")


# ---------------------------------------------------------------------------------------------
# part c: mixture of experts


def hivemind_servers(args: argparse.Namespace, initial_peers: list[str], log_folder: str) -> list[subprocess.Popen]:
    """`hivemind-server` processes hosting the grid between them, one row range each."""
    rows, columns = args.grid
    command = os.path.join(os.path.dirname(sys.executable), "hivemind-server")
    servers = []
    for number, (low, high) in enumerate(row_ranges(rows, args.servers)):
        uids = [f"{args.prefix}.{i}.{j}" for i in range(low, high) for j in range(columns)]
        log = open(os.path.join(log_folder, f"hivemind-server-{number}.log"), "w")  # noqa: SIM115 - the process's
        servers.append(subprocess.Popen(
            [command, "--expert_uids", *uids, "--expert_cls", "ffn", "--hidden_dim", str(args.hidden),
             "--device", "cpu", "--optimizer", "adam", "--update_period", "10", "--initial_peers", *initial_peers],
            stdout=log, stderr=subprocess.STDOUT))
    return servers


def wait_for_experts(dht: Any, uids: list[str], servers: list[subprocess.Popen], timeout: float) -> None:
    """Until every expert of the grid is declared in the DHT; raises if a server ends or time runs out."""
    from hivemind.moe import get_experts

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(server.poll() is not None for server in servers):
            raise RuntimeError("a hivemind-server process ended at start (see its log)")
        if not dht.is_alive():
            raise RuntimeError("this process's hivemind.DHT process ended")
        if all(expert is not None for expert in get_experts(dht, uids)):
            return
        time.sleep(1.0)
    raise RuntimeError(f"the hivemind servers did not declare all {len(uids)} experts within {timeout:.0f}s")


def hivemind_layer(args: argparse.Namespace, log_folder: str) -> float:
    """hivemind's RemoteMixtureOfExperts over `hivemind-server` processes: median samples/s."""
    import hivemind
    import torch

    rows, columns = args.grid
    dht = hivemind.DHT(host_maddrs=LOOPBACK, start=True)
    servers = hivemind_servers(args, [str(m) for m in dht.get_visible_maddrs()], log_folder)
    try:
        wait_for_experts(dht, [f"{args.prefix}.{i}.{j}" for i in range(rows) for j in range(columns)], servers,
                         args.timeout)
        torch.manual_seed(0)
        layer = hivemind.RemoteMixtureOfExperts(
            in_features=args.hidden, grid_size=(rows, columns), dht=dht, uid_prefix=f"{args.prefix}.", k_best=args.k,
            forward_timeout=args.timeout, backward_timeout=args.timeout)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, args.hidden, generator=generator)
        grad = torch.randn(args.batch, args.hidden, generator=generator)

        def step() -> None:
            layer(x.clone().requires_grad_(True)).backward(grad)

        return timed_steps(step, args.steps, args.warmup, args.batch)
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        dht.shutdown()


def apiary_layer(args: argparse.Namespace) -> dict[str, Any]:
    """benchmarks/moe_layer.py's figures on the same layer, from the project's environment."""
    rows, columns = args.grid
    command = [args.apiary_python, os.path.join(ROOT, "benchmarks", "moe_layer.py"), "--json",
               "--hidden", str(args.hidden), "--grid", f"{rows}x{columns}", "--k", str(args.k),
               "--batch", str(args.batch), "--servers", str(args.servers), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--prefix", args.prefix, "--timeout", str(args.timeout)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"benchmarks/moe_layer.py failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def moe_part(args: argparse.Namespace) -> None:
    import tempfile

    import hivemind

    rows, columns = args.grid
    print(f"hivemind {hivemind.__version__}, MoE part: {args.servers} servers, grid {rows}x{columns} of ffn experts "
          f"(hidden {args.hidden}), k_best {args.k}, batch {args.batch}", flush=True)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="hivemind-moe-") as log_folder:
        theirs = hivemind_layer(args, log_folder)
    print(f"hivemind RemoteMixtureOfExperts: {theirs:.0f} samples/s (forward + backward)", flush=True)
    ours = apiary_layer(args)
    print(f"apiary RemoteMixtureOfExperts:   {ours['samples_per_second']:.0f} samples/s (forward + backward)", flush=True)
    save("hivemind", {"version": hivemind.__version__, "hidden": args.hidden, "grid": [rows, columns], "k": args.k,
                      "batch": args.batch, "servers": args.servers, "steps": args.steps, "load_before": load_before,
                      "load_after": os.getloadavg()[0], "hivemind_samples_per_second": theirs,
                      "apiary_samples_per_second": ours["samples_per_second"]}, preset="moe")


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["dht", "averaging", "moe", "all"])
    dht = parser.add_argument_group("dht")
    dht.add_argument("--nodes", type=int, default=16, help="DHT nodes (each is a p2pd process; keep modest)")
    dht.add_argument("--mode", choices=["process", "node"], default="process",
                     help="process: hivemind.DHT per node; node: DHTNode objects on one loop in this process")
    dht.add_argument("--rounds", type=int, default=1)
    dht.add_argument("--keys", type=int, default=100, help="stores per round")
    dht.add_argument("--kill", type=float, default=0.1, help="fraction of live nodes shut down per round")
    dht.add_argument("--concurrency", type=int, default=8, help="operations in flight at once")
    dht.add_argument("--join-through", type=int, default=1, help="random earlier nodes a new node joins through")
    dht.add_argument("--seed", type=int, default=0)
    avg = parser.add_argument_group("averaging")
    avg.add_argument("--peers", type=int, default=4)
    avg.add_argument("--numel", type=int, default=10_000_000)
    avg.add_argument("--codecs", default="none,float16", help="comma-separated: none, float16")
    avg.add_argument("--repeats", type=int, default=3)
    avg.add_argument("--threads", type=int, default=1, help="torch threads per peer (benchmarks/averaging.py: 1)")
    avg.add_argument("--min-matchmaking-time", type=float, default=5.0, help="hivemind's default is 5.0")
    layer = parser.add_argument_group("moe (the layer's flags as benchmarks/moe_layer.py's)")
    layer_arguments(layer)
    layer.add_argument("--prefix", default="lm", help="the grid's name")
    layer.add_argument("--apiary-python", default=str(ROOT / ".venv" / "bin" / "python"),
                       help="the project's python, which runs benchmarks/moe_layer.py")
    parser.add_argument("--timeout", type=float, default=120.0, help="per operation / step, seconds")
    args = parser.parse_args()
    if args.part in ("dht", "all"):
        dht_part(args)
    if args.part == "all":
        print()
    if args.part in ("averaging", "all"):
        averaging_part(args)
    if args.part == "all":
        print()
    if args.part in ("moe", "all"):
        moe_part(args)


if __name__ == "__main__":
    main()

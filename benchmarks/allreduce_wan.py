"""All-reduce of 100 million float32 among 4 hosts on shaped links (network namespaces), against
the bandwidth bound of a butterfly all-reduce; and DiLoCo versus gradient averaging on such links.

Every host gets its own namespace, address and link (`tests/net`): a veth pair with `tbf` on
both ends, so each host can upload and download at the link rate B. In a butterfly all-reduce
every peer uploads its part for each other peer and then each other peer's reduced part, so
each link carries 2·S·(n−1)/n bytes each way and no schedule can finish sooner than

    bound = 2·S·(n−1) / (n·B)        (S: bytes per peer, n: peers, B: link rate in bytes/s)

Each host runs one worker process with an apiary.wire server and the averaging Reduce route;
the group is given (no matchmaking), so the time is the all-reduce alone. One warm-up round on
the unshaped links opens the connections and allocates the buffers, as in any round after a
run's first; then, per rate, the links are shaped and `--repeats` rounds are timed. Prints,
per rate, the round time, the bound and bound/round (1.0 = the links are the only limit).
Workers print a checksum of the averaged vector, which must agree.

The second part (`--parts training`) trains the language-model task (`charlm`) on 4 hosts,
one `apiary trainer` per host, on links of `--training-rate` Mbit/s and `--training-rtt-ms`:
first averaging gradients every epoch of `peers x batch` samples (one step per peer), then with
DiLoCo (`--mode diloco`, `--diloco-h` local steps per peer between outer steps, so each epoch
is H times larger), on the same number of samples. Prints, per mode, the wall time, the bytes
each peer exchanged (sent + received, its averager's counters) per epoch and in all, the samples
trained and the held-out loss; then the ratios gradients / DiLoCo.

Needs root (namespaces). Usage:
    python benchmarks/allreduce_wan.py [--parts allreduce,training] [--peers 4] [--numel 100000000]
        [--rates 1000,100] [--rtt-ms 0] [--training-rate 100] [--training-rtt-ms 50] [--diloco-h 8]
        [--outer-epochs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from record import save

TESTS = Path(__file__).resolve().parents[1] / "tests"
# the training part: a model whose averaging rounds carry ~2 MB per peer, small enough for 4
# trainers on a 2-core machine; quick matchmaking, a little slower than on loopback for the RTT
TRAINING_MODEL = {"width": 128, "layers": 2, "heads": 4, "context": 64, "batch_size": 16, "eval_batches": 2}
TRAINING_ROUNDS = {"gather_seconds": 1.0, "join_seconds": 2.0, "sender_timeout": 10.0}


async def run_worker(index: int, numel: int, host: str) -> None:
    import torch

    from apiary.averaging.allreduce import REDUCE_ROUTE, AllReduceService, GroupRound
    from apiary.averaging.compression import codec_by_name
    from apiary.averaging.exchange import run_allreduce
    from apiary.averaging.spans import Member, Role
    from apiary.wire import Identity, RpcServer, WireSettings
    from apiary.wire.bulk import BulkClient

    torch.set_num_threads(1)  # the hosts share this machine's cores
    identity = Identity.generate()
    server = RpcServer(WireSettings(listen_host=host, bulk_port=7101, tls=False), identity)  # plaintext, as the figures in docs/benchmarks.md (benchmarks/trust.py measures TLS)
    service = AllReduceService()
    server.bulk.add_route(REDUCE_ROUTE, service.handle, keeps_tensors=False)
    await server.start()
    print(json.dumps({"peer_id": identity.peer_id, "bulk": str(server.announced_bulk)}), flush=True)
    flat = torch.randn(numel, generator=torch.Generator().manual_seed(index))
    client = BulkClient(server.settings)
    out = None  # the averaged vector, reused round after round as the averager does
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = json.loads(line)
        await asyncio.sleep(max(0.0, command["start"] - time.time()))
        members = [Member(m["peer_id"], m["bulk"], Role.NODE, 1.0) for m in command["members"]]
        round_ = GroupRound(f"wan-{command['round']}", members, index, numel, sender_timeout=600)
        started = time.perf_counter()
        out = await run_allreduce(round_, flat, 1.0, service=service, client=client,
                                  codec=codec_by_name("none"), deadline=1200, out=out)
        elapsed = time.perf_counter() - started
        print(json.dumps({"elapsed": elapsed, "checksum": float(out[:1_000_000].double().sum())}), flush=True)
    await client.close()
    await server.stop()


def allreduce_part(args: argparse.Namespace) -> None:
    from net.network import Link, Network

    rates = [float(rate) for rate in args.rates.split(",")]
    results: dict[float, tuple[float, float]] = {}
    with Network([Link(rtt_ms=args.rtt_ms)] * args.peers) as net:
        workers = [host.python(str(Path(__file__).resolve()), "--worker", str(host.index), "--numel",
                               str(args.numel), "--host", host.address, stdin=True, name=f"worker {host.index}")
                   for host in net.hosts]
        members = [worker.result(120) for worker in workers]
        rounds = iter(range(1_000_000))

        def run_round() -> float:
            command = {"start": time.time() + 0.5, "members": members, "round": next(rounds)}
            for worker in workers:
                worker.send(json.dumps(command))
            replies = [worker.result(1800) for worker in workers]
            checksums = {round(reply["checksum"], 3) for reply in replies}
            if len(checksums) != 1:
                raise RuntimeError(f"workers disagree on the average: {checksums}")
            return max(reply["elapsed"] for reply in replies)

        run_round()  # warm-up, unshaped
        for rate in rates:
            for host in net.hosts:
                host.shape(rate)
            results[rate] = (statistics.median(run_round() for _ in range(args.repeats)), rate)
        for worker in workers:
            worker.process.stdin.close()
    nbytes = args.numel * 4
    print(f"{args.peers} hosts, {args.numel:,} float32 ({nbytes / 1e6:.0f} MB each), butterfly all-reduce, "
          f"no compression, links shaped with tbf{f', {args.rtt_ms:g} ms RTT each' if args.rtt_ms else ''}; "
          f"median of {args.repeats} round(s) after a warm-up round")
    rows = []
    for rate, (elapsed, _) in results.items():
        bound = 2 * nbytes * (args.peers - 1) / (args.peers * rate * 1e6 / 8)
        rows.append({"mbit_per_s": rate, "round_seconds": elapsed, "bound_seconds": bound})
        print(f"{rate:6.0f} Mbit/s links: round {elapsed:7.2f} s   bound 2·S·(n−1)/(n·B) {bound:7.2f} s   "
              f"bound/round {bound / elapsed:.2f}", flush=True)
    save("allreduce_wan", {"peers": args.peers, "numel": args.numel, "repeats": args.repeats, "rtt_ms": args.rtt_ms,
                           "rates": rows}, preset="allreduce")


def train_swarm(args: argparse.Namespace, mode: str, directory: Path) -> list[dict[str, Any]]:
    """One run of `args.peers` trainers in `mode` on fresh shaped hosts; their summaries."""
    from net.network import Link, Network
    from net.trainers import read_summary, start_trainers

    step_samples = args.peers * json.loads(args.task_options).get("batch_size", 16)  # charlm's default
    if mode == "diloco":
        schedule = ["--mode", "diloco", "--target-batch-size", str(step_samples * args.diloco_h),
                    "--max-epochs", str(args.outer_epochs), "--outer-momentum", "0.5"]  # a short run: less momentum
    else:
        schedule = ["--target-batch-size", str(step_samples), "--max-epochs", str(args.diloco_h * args.outer_epochs)]
    options = ["--task", "charlm", "--task-options", args.task_options, "--averaging", args.averaging,
               "--threads", "1", "--min-peers", str(args.peers), "--average-state-every", "0",
               "--evaluate-every", "3600", *schedule]
    with Network([Link(rate_mbit=args.training_rate, rtt_ms=args.training_rtt_ms)] * args.peers) as net:
        trainers = start_trainers(net.hosts, f"wan-{mode}", directory, options, timeout=300)
        for trainer in trainers:
            if trainer.wait(3600) != 0:
                raise RuntimeError(f"a trainer failed:\n{trainer.report()}")
        return [read_summary(directory, host.index) for host in net.hosts]


def training_part(args: argparse.Namespace) -> None:
    results = {}
    for mode in ("gradients", "diloco"):
        with tempfile.TemporaryDirectory() as directory:
            summaries = train_swarm(args, mode, Path(directory))
        epochs = statistics.mean(s["epoch_end"] - s["epoch_start"] for s in summaries)
        results[mode] = {
            "epochs": epochs,
            "samples": sum(s["samples"] for s in summaries),
            "seconds": max(s["seconds"] for s in summaries),
            "bytes": statistics.mean(s["averaged_bytes"] for s in summaries),  # per peer
            "loss": statistics.mean(s["loss_end"] for s in summaries),
            "rounds": summaries[0]["rounds"],
        }
    batch = json.loads(args.task_options).get("batch_size", 16)  # charlm's default
    target = args.peers * batch * args.diloco_h * args.outer_epochs
    print(f"\nDiLoCo versus gradient averaging: {args.peers} hosts, {args.training_rate:g} Mbit/s links, "
          f"{args.training_rtt_ms:g} ms RTT; charlm {args.task_options}; {target} samples per run "
          f"(gradients: {args.diloco_h * args.outer_epochs} epochs of {args.peers * batch}; diloco: "
          f"{args.outer_epochs} epochs of {args.peers * batch * args.diloco_h}, H = {args.diloco_h})")
    print(f"{'mode':10} {'epochs':>6} {'samples':>8} {'wall s':>7} {'s/epoch':>8} {'MB/epoch/peer':>14} "
          f"{'MB/peer':>8} {'loss end':>8}  rounds")
    for mode, r in results.items():
        print(f"{mode:10} {r['epochs']:6.1f} {r['samples']:8d} {r['seconds']:7.1f} {r['seconds'] / r['epochs']:8.2f} "
              f"{r['bytes'] / r['epochs'] / 1e6:14.2f} {r['bytes'] / 1e6:8.1f} {r['loss']:8.3f}  {r['rounds']}")
    gradients, diloco = results["gradients"], results["diloco"]
    print(f"gradients / diloco: bytes per peer {gradients['bytes'] / diloco['bytes']:.1f}x, "
          f"wall time {gradients['seconds'] / diloco['seconds']:.1f}x, "
          f"bytes per sample {(gradients['bytes'] / gradients['samples']) / (diloco['bytes'] / diloco['samples']):.1f}x",
          flush=True)
    save("allreduce_wan", {"peers": args.peers, "rate_mbit_per_s": args.training_rate, "rtt_ms": args.training_rtt_ms,
                           "diloco_h": args.diloco_h, "outer_epochs": args.outer_epochs,
                           "task_options": json.loads(args.task_options), "modes": results}, preset="training")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="allreduce,training", help="allreduce, training, or both (comma-separated)")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--numel", type=int, default=100_000_000)
    parser.add_argument("--rates", default="1000,100", help="link rates to measure, Mbit/s, comma-separated")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time each link adds (user-space relay)")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds per rate (median reported)")
    parser.add_argument("--training-rate", type=float, default=100.0, help="link rate of the training part, Mbit/s")
    parser.add_argument("--training-rtt-ms", type=float, default=50.0, help="round-trip time of the training part's links")
    parser.add_argument("--diloco-h", type=int, default=8, help="DiLoCo: local steps per peer between outer steps")
    parser.add_argument("--outer-epochs", type=int, default=3, help="DiLoCo epochs (gradient averaging: H times more)")
    parser.add_argument("--task-options", default=json.dumps(TRAINING_MODEL), help="charlm settings (JSON)")
    parser.add_argument("--averaging", default=json.dumps(TRAINING_ROUNDS), help="averager settings (JSON)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--host", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        asyncio.run(run_worker(args.worker, args.numel, args.host))
        return

    sys.path.insert(0, str(TESTS))
    from net.network import skip_reason

    if reason := skip_reason():
        sys.exit(f"allreduce_wan: {reason}")
    parts = set(args.parts.split(","))
    if unknown := parts - {"allreduce", "training"}:
        sys.exit(f"allreduce_wan: unknown --parts {', '.join(sorted(unknown))} (allreduce, training)")
    if "allreduce" in parts:
        allreduce_part(args)
    if "training" in parts:
        training_part(args)


if __name__ == "__main__":
    main()

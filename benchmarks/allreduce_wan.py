"""All-reduce of 100 million float32 among 4 hosts on shaped links (network namespaces), against
the bandwidth bound of a butterfly all-reduce.

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

Needs root (namespaces). Usage:
    python benchmarks/allreduce_wan.py [--peers 4] [--numel 100000000] [--rates 1000,100] [--rtt-ms 0]

DiLoCo versus gradient averaging (bytes and wall time per epoch on the same links) comes with
the collaborative optimizer: it belongs here, as a second table of this benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


async def run_worker(index: int, numel: int, host: str) -> None:
    import torch

    from apiary.averaging.allreduce import (
        REDUCE_ROUTE,
        AllReduceService,
        GroupRound,
        run_allreduce,
    )
    from apiary.averaging.compression import codec_by_name
    from apiary.averaging.partition import Member, Mode
    from apiary.wire import Identity, RpcServer, WireSettings
    from apiary.wire.bulk import BulkClient

    torch.set_num_threads(1)  # the hosts share this machine's cores
    identity = Identity.generate()
    server = RpcServer(WireSettings(listen_host=host, bulk_port=7101), identity)
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
        members = [Member(m["peer_id"], m["bulk"], Mode.NODE, 1.0) for m in command["members"]]
        round_ = GroupRound(f"wan-{command['round']}", members, index, numel, sender_timeout=600)
        started = time.perf_counter()
        out = await run_allreduce(round_, flat, 1.0, service=service, client=client,
                                  codec=codec_by_name("none"), deadline=1200, out=out)
        elapsed = time.perf_counter() - started
        print(json.dumps({"elapsed": elapsed, "checksum": float(out[:1_000_000].double().sum())}), flush=True)
    await client.close()
    await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--numel", type=int, default=100_000_000)
    parser.add_argument("--rates", default="1000,100", help="link rates to measure, Mbit/s, comma-separated")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time each link adds (user-space relay)")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds per rate (median reported)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--host", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        asyncio.run(run_worker(args.worker, args.numel, args.host))
        return

    sys.path.insert(0, str(TESTS))
    from net.network import Link, Network, skip_reason

    if reason := skip_reason():
        sys.exit(f"allreduce_wan: {reason}")
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
    for rate, (elapsed, _) in results.items():
        bound = 2 * nbytes * (args.peers - 1) / (args.peers * rate * 1e6 / 8)
        print(f"{rate:6.0f} Mbit/s links: round {elapsed:7.2f} s   bound 2·S·(n−1)/(n·B) {bound:7.2f} s   "
              f"bound/round {bound / elapsed:.2f}")


if __name__ == "__main__":
    main()

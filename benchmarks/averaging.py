"""All-reduce of 100 million float32 among 4 peer processes over loopback, against the bound
that raw socket throughput, measured in the same run, implies.

Each worker process hosts an apiary.wire server with the averaging Reduce route. The parent
hands every worker the group and a start time, then:
  raw     - every worker sends the bytes a butterfly all-reduce moves (its part for each other
            peer, and each other peer's reduced part back) over plain sockets to the others,
            all at once: the time this takes is the bound;
  codecs  - one all-reduce round per codec through apiary.averaging (GroupRound/run_allreduce,
            no matchmaking: the group is given) with equal bandwidths;
  verify  - (--verify) codec none with reductions verified (signed commitments, every span
            audited): its round time and audit bytes against the unverified round's.
Prints the round time per codec, the raw bound, and bound/round (the fraction of the bound
reached; 1.0 = as fast as raw sockets). Usage:
python benchmarks/averaging.py [--peers 4] [--numel 100000000] [--codecs none,float16,uniform8] [--verify]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

from measure import raw_exchange
from record import save


async def worker(index: int, numel: int) -> None:
    import torch

    from apiary.averaging.allreduce import REDUCE_ROUTE, AllReduceService, GroupRound
    from apiary.averaging.compression import codec_by_name
    from apiary.averaging.exchange import run_allreduce
    from apiary.averaging.spans import Member, Role
    from apiary.averaging.verification import AUDIT_ROUTE, PART_ROUTE, Verifier
    from apiary.wire import Identity, RpcServer, WireSettings
    from apiary.wire.bulk import BulkClient

    torch.set_num_threads(1)  # the peers share this machine's cores; one thread each, as one core per peer
    identity = Identity.generate()
    server = RpcServer(WireSettings(listen_host="127.0.0.1", tls=False), identity)  # plaintext, as the figures in docs/benchmarks.md (benchmarks/trust.py measures TLS)
    service = AllReduceService()
    server.bulk.add_route(REDUCE_ROUTE, service.handle, keeps_tensors=False)
    server.bulk.add_route(AUDIT_ROUTE, service.handle_audit)
    server.bulk.add_route(PART_ROUTE, service.handle_part)
    verifier = Verifier(identity)
    await server.start()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    print(json.dumps({"peer_id": identity.peer_id, "bulk": str(server.announced_bulk),
                      "raw": listener.getsockname()[1]}), flush=True)
    torch.manual_seed(index)
    flat = torch.randn(numel)
    client = BulkClient(server.settings)
    sent_by_route: dict[str, int] = {}  # request and reply bytes (bodies and tensors) of our calls
    call = client.call

    async def counted_call(endpoint, route, **kwargs):  # noqa: ANN001, ANN202 - BulkClient.call's
        body, tensors = await call(endpoint, route, **kwargs)
        moved = len(kwargs.get("body", b"")) + sum(h.nbytes for h, _ in kwargs.get("tensors", ()))
        sent_by_route[route] = sent_by_route.get(route, 0) + moved + len(body) + sum(h.nbytes for h, _ in tensors)
        return body, tensors

    client.call = counted_call  # type: ignore[method-assign]
    out = None  # the averaged vector, reused round after round as the averager does
    sinks: dict[int, memoryview] = {}
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = json.loads(line)
        await asyncio.sleep(max(0.0, command["start"] - time.time()))
        if command["what"] == "raw":
            elapsed = await raw_exchange(index, command["raw_ports"], listener, command["nbytes"], sinks)
        else:
            members = [Member(m["peer_id"], m["bulk"], Role.NODE, 1.0) for m in command["members"]]
            verify = command["what"] == "verify"
            round_ = GroupRound(f"bench-{command['round']}", members, index, numel, sender_timeout=300, verify=verify)
            sent_by_route.clear()
            started = time.perf_counter()
            out = await run_allreduce(round_, flat, 1.0, service=service, client=client,
                                      codec=codec_by_name("none" if verify else command["what"]), deadline=600,
                                      out=out, verifier=verifier if verify else None)
            elapsed = time.perf_counter() - started
        print(json.dumps({"elapsed": elapsed, "bytes": sent_by_route}), flush=True)
    await client.close()
    await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--numel", type=int, default=100_000_000)
    parser.add_argument("--codecs", default="none,float16,uniform8")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per measurement (median reported)")
    parser.add_argument("--verify", action="store_true", help="also time rounds with verified reductions (codec none)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        asyncio.run(worker(args.worker, args.numel))
        return
    workers = [
        subprocess.Popen([sys.executable, __file__, "--worker", str(i), "--numel", str(args.numel)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ})
        for i in range(args.peers)
    ]
    try:
        infos = [json.loads(w.stdout.readline()) for w in workers]
        members = [{"peer_id": info["peer_id"], "bulk": info["bulk"]} for info in infos]

        rounds = iter(range(1_000_000))

        moved: dict[str, dict[str, int]] = {}  # per measurement: bytes our calls moved, by route, all peers

        def run(what: str, **extra: object) -> float:
            start = time.time() + 0.5
            command = {"what": what, "start": start, "members": members, "round": next(rounds), **extra}
            for w in workers:
                w.stdin.write(json.dumps(command) + "\n")
                w.stdin.flush()
            replies = [json.loads(w.stdout.readline()) for w in workers]
            moved[what] = {route: sum(r["bytes"].get(route, 0) for r in replies) for route in replies[0]["bytes"]}
            return max(r["elapsed"] for r in replies)

        # a butterfly round moves, per pair of peers, one part each way and one reduced part back
        part_bytes = args.numel * 4 // args.peers
        raw_ports = [info["raw"] for info in infos]
        raw = statistics.median(run("raw", raw_ports=raw_ports, nbytes=2 * part_bytes) for _ in range(args.repeats))
        run("none")  # warm-up: connections and buffers, as in any round after a run's first
        results = {codec: statistics.median(run(codec) for _ in range(args.repeats)) for codec in args.codecs.split(",")}
        if args.verify:
            results["verify"] = statistics.median(run("verify") for _ in range(args.repeats))
            if "none" not in results:
                results["none"] = statistics.median(run("none") for _ in range(args.repeats))
    finally:
        for w in workers:
            w.stdin.close()
        for w in workers:
            if w.wait(timeout=60) is None:
                w.kill()
    print(f"{args.peers} peers, {args.numel:,} float32 ({args.numel * 4 / 1e6:.0f} MB each), loopback, "
          f"median of {args.repeats} rounds after a warm-up round")
    print(f"raw-socket bound (same bytes, plain sockets): {raw:7.2f} s")
    for codec, elapsed in results.items():
        if codec != "verify":
            print(f"all-reduce, codec {codec:15s}         {elapsed:7.2f} s   bound/round {raw / elapsed:.2f}")
    figures: dict[str, object] = {"peers": args.peers, "numel": args.numel, "repeats": args.repeats,
                                  "raw_seconds": raw, "round_seconds": results}
    if "verify" in results:
        reduce_bytes = moved["none"].get("apiary.averaging/Reduce", 0)
        audit_bytes = sum(n for route, n in moved["verify"].items() if route != "apiary.averaging/Reduce")
        figures |= {"reduce_bytes": reduce_bytes, "audit_bytes": audit_bytes}
        print(f"all-reduce, codec none, verified       {results['verify']:7.2f} s   "
              f"time / unverified {results['verify'] / results['none']:.2f}   audit bytes {audit_bytes:,} "
              f"(all peers; / all-reduce bytes {audit_bytes / max(reduce_bytes, 1):.4f})")
    save("averaging", figures, preset="verify" if args.verify else None)


if __name__ == "__main__":
    main()

"""benchmarks/relay.py across network namespaces: the relay, the target and the dialer each on a
host of its own (`tests/net`), every link shaped to the same rate and round-trip time; in the
same run, an all-reduce through the relay against the same all-reduce direct, and a NATed
service's time from start to its reachability verdict and to a usable relayed address.

Bulk: the roles are relay.py's own (`--role relay|target`, started on hosts h0 and h1); the
dialer runs `relay.measure` on h2. Direct, the dialer's bytes cross two links (h2's upload, h1's
download); through the relay four (h2 up, h0 down, h0 up, h1 down), so the relayed path has
twice the round-trip time of the direct one, as a relay in another place of the internet would.

All-reduce: two workers (`--worker`: a wire server with the averaging Reduce route, as in
benchmarks/allreduce_wan.py), on h1 and h2; h1's holds a reservation at h0's relay. A round
of `--allreduce-mib` float32 per worker (each size in turn) is timed with h1 given to h2 at its
direct bulk address, then at its relayed one (h2 reaches h1 only through the relay, h1 dials h2
direct), alternately, `--repeats` times each after one warm-up round of each; hole punching is
off (`relay_punch`), so relayed rounds stay relayed.

Verdict: three public `apiary dht` nodes (h0's relaying, `--reachability-period 5` while the
swarm forms), then one behind a cone NAT (h3) with the defaults (`--reachability auto`): the
seconds from launching its process to its admin line (started, joined the DHT), to a verdict on
/status (`reachability.state` not `unknown`), to `relayed` with a relayed address, and to that
address answering a Ping from h2 (a usable reservation).

Needs root (namespaces; the NAT: iptables). Saved as relay-netns. Usage:
    python benchmarks/relay_netns.py [--rate 100] [--rtt-ms 50] [--mib 64] [--allreduce-mib 32,128]
        [--repeats 3] [--plaintext]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import relay as bench
from record import save

ADMIN = r"admin: http://127\.0\.0\.1:(\d+)"
SWARM_CHECKS = ("--reachability-period", "5")  # the public nodes only: their swarm forms quickly


def dialer(args: argparse.Namespace) -> None:
    """Runs on h2: the measurement of relay.py between the roles it is given."""
    figures = asyncio.run(bench.measure(args, json.loads(args.relay_info), json.loads(args.target_info)))
    print(json.dumps(figures), flush=True)


async def worker(args: argparse.Namespace) -> None:
    """Runs on h1 and h2: one all-reduce round per command line read from stdin (h1's worker also
    holds a reservation at `args.relay_info` and prints its relayed endpoint)."""
    import torch

    from apiary.averaging.allreduce import REDUCE_ROUTE, AllReduceService, GroupRound
    from apiary.averaging.compression import codec_by_name
    from apiary.averaging.exchange import run_allreduce
    from apiary.averaging.spans import Member, Role
    from apiary.wire import ChannelPool, Identity, PeerAddress, RpcServer
    from apiary.wire.bulk import BulkClient
    from apiary.wire.relay import Reservations

    torch.set_num_threads(1)  # the hosts share this machine's cores
    server = RpcServer(bench._settings(args), Identity.generate())
    service = AllReduceService()
    assert server.bulk is not None
    server.bulk.add_route(REDUCE_ROUTE, service.handle, keeps_tensors=False)
    await server.start()
    pool, reservations, relayed = ChannelPool.like(server), None, None
    if args.relay_info:
        relay = PeerAddress.parse(json.loads(args.relay_info)["relay"])

        async def relays() -> list[PeerAddress]:
            return [relay]

        reservations = Reservations(server, pool, relays, count=1)
        await reservations.start()
        async with asyncio.timeout(60):
            while not reservations.endpoints:
                await asyncio.sleep(0.01)
        relayed = str(reservations.endpoints[0])
    print(json.dumps({"peer_id": server.identity.peer_id, "bulk": str(server.announced_bulk), "relayed": relayed}),
          flush=True)
    client, generator = BulkClient(server.settings, identity=server.identity), torch.Generator()
    flats: dict[int, torch.Tensor] = {}  # by numel: this worker's vector
    outs: dict[int, torch.Tensor] = {}  # by numel: the averaged vector, reused round after round
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = json.loads(line)
        await asyncio.sleep(max(0.0, command["start"] - time.time()))
        members = [Member(m["peer_id"], m["bulk"], Role.NODE, 1.0) for m in command["members"]]
        index = [m.peer_id for m in members].index(server.identity.peer_id)
        numel = command["numel"]
        if numel not in flats:
            flats[numel] = torch.randn(numel, generator=generator.manual_seed(args.worker))
        flat = flats[numel]
        round_ = GroupRound(f"relay-{command['round']}", members, index, numel, sender_timeout=600)
        started = time.perf_counter()
        out = outs[numel] = await run_allreduce(round_, flat, 1.0, service=service, client=client, deadline=1200,
                                                codec=codec_by_name("none"), out=outs.get(numel))
        print(json.dumps({"elapsed": time.perf_counter() - started, "checksum": float(out[:1_000_000].sum())}),
              flush=True)
    await client.close()
    if reservations is not None:
        await reservations.stop()
    await pool.close()
    await server.stop(0)


async def pinger(args: argparse.Namespace) -> None:
    """Runs on h2: reads one address from stdin, answers the wall time its first Ping came back."""
    from apiary.wire import PROBE, ChannelPool, PeerAddress, RpcClient
    from apiary.wire.protos.wire_pb2 import PingRequest

    pool = ChannelPool(bench._settings(args))
    print(json.dumps({"ready": True}), flush=True)
    address = PeerAddress.parse((await asyncio.to_thread(sys.stdin.readline)).strip())
    try:
        await RpcClient(pool, PROBE, address.endpoint, peer_id=address.peer_id, timeout=30).call("Ping", PingRequest())
        print(json.dumps({"at": time.time()}), flush=True)
    finally:
        await pool.close()


def allreduce(args: argparse.Namespace, hosts: list[Any], relay_info: dict[str, Any]) -> list[dict[str, Any]]:
    """Seconds per all-reduce round between h1 and h2, h1 given direct and given relayed, per size."""
    common = ["--plaintext"] if args.plaintext else []
    reserving = {hosts[1].index: ["--relay-info", json.dumps(relay_info)]}
    workers = [host.python(__file__, "--worker", str(host.index), "--listen-host", host.address, *common,
                           *reserving.get(host.index, []), stdin=True, name=f"worker {host.name}")
               for host in hosts[1:3]]
    one, two = (process.result(120) for process in workers)
    groups = {"direct": [{**one, "relayed": None}, two], "relayed": [{**one, "bulk": one["relayed"]}, two]}
    rounds = iter(range(1_000_000))

    def run_round(group: str, mib: int) -> float:
        command = {"start": time.time() + 0.5, "members": groups[group], "round": next(rounds),
                   "numel": (mib << 20) // 4}
        for process in workers:
            process.send(json.dumps(command))
        replies = [process.result(60 + 4 * mib * 8 / args.rate) for process in workers]
        if len({round(reply["checksum"], 2) for reply in replies}) != 1:
            raise RuntimeError(f"the workers disagree on the average: {replies}")
        return max(reply["elapsed"] for reply in replies)

    sizes = []
    for mib in args.allreduce_mib:
        times: dict[str, list[float]] = {"direct": [], "relayed": []}
        for group in times:
            run_round(group, mib)  # warm-up: connections made (the circuit included), buffers allocated
        for _ in range(args.repeats):
            for group, values in times.items():
                values.append(run_round(group, mib))
        seconds = {group: statistics.median(values) for group, values in times.items()}
        sizes.append({"mib": mib, "peers": 2, "round_s": seconds, "ratio": seconds["direct"] / seconds["relayed"],
                      "rounds_s": times})
    for process in workers:
        process.process.stdin.close()
    return sizes


def verdict(hosts: list[Any]) -> dict[str, float]:
    """Seconds from launching a NATed `apiary dht` (h3) to its verdict, to relayed and to usable."""
    import httpx

    from apiary.wire import PeerAddress

    relaying = hosts[0].apiary("dht", "--new-swarm", "--port", "7000", "--relay", "--relay-port", "7300", *SWARM_CHECKS)
    bootstrap = relaying.wait_for(r"others join with: --initial-peers (\S+)", 90).group(1)
    public = [relaying, *(host.apiary("dht", "--port", "7000", "--initial-peers", bootstrap, *SWARM_CHECKS)
                          for host in hosts[1:3])]

    def status(host: Any, process: Any) -> dict[str, Any]:
        admin = f"http://{host.forward(int(process.wait_for(ADMIN, 90).group(1)))}"
        return httpx.get(f"{admin}/status", timeout=5).json()

    deadline = time.monotonic() + 120
    while not all(status(host, process).get("reachability", {}).get("state") == "public"
                  for host, process in zip(hosts, public)):
        if time.monotonic() > deadline:
            raise RuntimeError("verdict: the public dht nodes were not found public in 120 s")
        time.sleep(0.5)
    ping = hosts[2].python(__file__, "--pinger", stdin=True, name="pinger")
    ping.result(60)
    launched = time.time()
    natted = hosts[3].apiary("dht", "--port", "7000", "--initial-peers", bootstrap)
    admin = f"http://{hosts[3].forward(int(natted.wait_for(ADMIN, 90).group(1)))}"
    figures = {"started_s": time.time() - launched}
    while "relayed_s" not in figures:
        current = httpx.get(f"{admin}/status", timeout=5).json()
        state = current.get("reachability", {}).get("state")
        if state not in (None, "unknown"):
            figures.setdefault("verdict_s", time.time() - launched)
            figures.setdefault("verdict", state)
        if state == "relayed" and PeerAddress.parse(current["address"]).endpoint.relayed:
            figures["relayed_s"] = time.time() - launched
            ping.send(current["address"])
        elif time.time() - launched > 120:
            raise RuntimeError(f"verdict: not relayed 120 s after its start: {current}")
        time.sleep(0.05)
    figures["usable_s"] = ping.result(60)["at"] - launched
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0, help="Mbit/s of every link, each direction")
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="round-trip time every link adds")
    parser.add_argument("--mib", type=int, default=64, help="bulk: tensor size in MiB")
    parser.add_argument("--allreduce-mib", type=lambda text: [int(mib) for mib in text.split(",")], default=[32, 128],
                        help="all-reduce: MiB of float32 per worker, each size in turn (comma-separated)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plaintext", action="store_true", help="no TLS")
    parser.add_argument("--dialer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pinger", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--listen-host", default="0.0.0.0", help=argparse.SUPPRESS)
    parser.add_argument("--relay-info", help=argparse.SUPPRESS)
    parser.add_argument("--target-info", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dialer:
        dialer(args)
        return
    if args.worker is not None:
        asyncio.run(worker(args))
        return
    if args.pinger:
        asyncio.run(pinger(args))
        return

    from net.network import Link, Network, nat_skip_reason, skip_reason

    if reason := skip_reason() or nat_skip_reason():
        raise SystemExit(f"relay_netns: {reason}")
    common = ["--mib", str(args.mib), "--repeats", str(args.repeats), *(["--plaintext"] if args.plaintext else [])]
    script = str(Path(bench.__file__).resolve())
    links = [Link(rate_mbit=args.rate, rtt_ms=args.rtt_ms)] * 3 + [Link(rate_mbit=args.rate, rtt_ms=args.rtt_ms,
                                                                        nat="cone")]
    with Network(links) as net:
        h0, h1, h2, _ = net.hosts
        relay = h0.python(script, "--role", "relay", "--listen-host", h0.address, *common, stdin=True, name="relay")
        relay_info = relay.result(120)
        target = h1.python(script, "--role", "target", "--relay", relay_info["relay"], "--listen-host", h1.address,
                           *common, stdin=True, name="target")
        target_info = target.result(120)
        measuring = h2.python(__file__, "--dialer", "--listen-host", h2.address, "--relay-info", json.dumps(relay_info),
                              "--target-info", json.dumps(target_info), *common, name="dialer")
        figures = measuring.result(60 + 4 * (args.repeats + 1) * args.mib * 8 / args.rate)
        target.process.stdin.close()
        figures["allreduce"] = allreduce(args, net.hosts, relay_info)
        figures["verdict"] = verdict(net.hosts)
    figures["links"] = {"mbit_per_s": args.rate, "rtt_ms": args.rtt_ms}
    rates, times = figures["mb_per_s"], figures["verdict"]
    print(f"{args.mib} MiB tensor, three hosts on {args.rate:g} Mbit/s links of {args.rtt_ms:g} ms RTT each, "
          f"{'TLS' if figures['tls'] else 'plaintext'}, median of {args.repeats}")
    print(f"bulk direct                 {rates['direct']:8.2f} MB/s")
    print(f"bulk through the relay      {rates['relayed']:8.2f} MB/s   ratio to direct {figures['ratio']:.2f}")
    for size in figures["allreduce"]:
        rounds = size["round_s"]
        print(f"all-reduce of {size['mib']:4d} MiB   direct {rounds['direct']:.2f} s per round, through a relay "
              f"{rounds['relayed']:.2f} s   ratio to direct {size['ratio']:.2f}")
    print(f"relay CPU                   {figures['relay_cpu_s_per_gbit']:8.3f} s per Gbit relayed")
    print(f"reservation held / usable   {figures['reservation_s']:8.3f} s / {figures['usable_reservation_s']:.3f} s "
          f"from the target's start")
    print(f"NATed apiary dht            started {times['started_s']:.2f} s, verdict ({times['verdict']}) "
          f"{times['verdict_s']:.2f} s, relayed {times['relayed_s']:.2f} s, usable {times['usable_s']:.2f} s "
          f"after its launch")
    print(f"Ping direct / relayed       {figures['ping_ms']['direct']:8.2f} ms / {figures['ping_ms']['relayed']:.2f} ms")
    save("relay", figures, preset="netns")


if __name__ == "__main__":
    main()

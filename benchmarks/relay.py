"""Bulk throughput through a relay (apiary.wire.relay) against the same transfer direct, in one run.

Three processes: a relay (an RpcServer with `relay` on), a target that keeps a reservation at
it (`Reservations`), and this one, the dialer. The dialer sends one tensor (256 MiB by default)
to the target's bulk Sink route, direct and then through the target's relayed endpoint, each
`--repeats` times, with TLS from dialer to target (the relay splices ciphertext), and reports:
  - MB/s direct and relayed (medians) and their ratio;
  - the relay process's CPU seconds per Gbit relayed (user + system, over the relayed runs);
  - the target's time from start to a reservation held, and to a usable one (its own Ping
    answered through the relay);
  - a Ping's round trip direct and relayed (median of 20).
Each role can run alone (`--role relay|target`, one JSON line printed once ready, until stdin
closes), so the same measurement runs across network namespaces with shaped links; by default
all three run on loopback.
Usage: python benchmarks/relay.py [--mib 256] [--repeats 3] [--plaintext]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from record import save

PINGS = 20


def _settings(args: argparse.Namespace, **update: Any) -> Any:
    from apiary.wire import WireSettings

    # no hole punching (apiary.wire.relay.punch): the relayed transfers must stay relayed to be measured
    return WireSettings(listen_host=args.listen_host, tls=not args.plaintext, default_timeout=600, relay_punch=False,
                        **update)


async def _until_stdin_closes() -> None:
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()
    threading.Thread(target=lambda: (sys.stdin.buffer.read(), loop.call_soon_threadsafe(closed.set)),
                     daemon=True).start()
    await closed.wait()


async def relay_role(args: argparse.Namespace) -> None:
    from apiary.wire import Identity, RpcServer

    server = RpcServer(_settings(args, relay=True), Identity.generate())
    await server.start()
    print(json.dumps({"relay": str(server.relay_address), "pid": os.getpid()}), flush=True)
    await _until_stdin_closes()
    await server.stop(0)


async def target_role(args: argparse.Namespace) -> None:
    from apiary.wire import PROBE, ChannelPool, Identity, PeerAddress, RpcClient, RpcServer
    from apiary.wire.protos.wire_pb2 import PingRequest
    from apiary.wire.relay import Reservations

    started = time.perf_counter()
    server = RpcServer(_settings(args), Identity.generate())
    await server.start()
    pool = ChannelPool.like(server)
    relay = PeerAddress.parse(args.relay)

    async def relays() -> list[PeerAddress]:
        return [relay]

    reservations = Reservations(server, pool, relays, count=1)
    await reservations.start()
    while not reservations.endpoints:
        await asyncio.sleep(0.005)
    reserved = time.perf_counter() - started
    endpoint = reservations.endpoints[0]
    await RpcClient(pool, PROBE, endpoint, timeout=30).call("Ping", PingRequest())
    usable = time.perf_counter() - started
    assert server.bulk is not None
    print(json.dumps({"grpc": str(server.announced), "bulk": str(server.announced_bulk), "relayed": str(endpoint),
                      "peer_id": server.identity.peer_id, "reserved_s": reserved, "usable_s": usable}), flush=True)
    await _until_stdin_closes()
    await reservations.stop()
    await pool.close()
    await server.stop(0)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(args: argparse.Namespace, relay: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    from apiary.wire import PROBE, ChannelPool, Endpoint, RpcClient
    from apiary.wire.bulk import BulkClient
    from apiary.wire.probe import SINK_ROUTE
    from apiary.wire.protos.wire_pb2 import PingRequest, SinkRequest, TensorHeader

    nbytes = args.mib << 20
    payload = memoryview(bytearray(os.urandom(1 << 20)) * args.mib)
    header = TensorHeader(dtype="uint8", shape=[nbytes], nbytes=nbytes)
    settings = _settings(args)
    direct, relayed = Endpoint.parse(target["bulk"]), Endpoint.parse(target["relayed"])
    client, pool = BulkClient(settings), ChannelPool(settings)
    body = SinkRequest().SerializeToString()

    async def send(endpoint: Endpoint) -> float:
        started = time.perf_counter()
        await client.call(endpoint, SINK_ROUTE, body=body, tensors=[(header, payload)], peer_id=target["peer_id"])
        return nbytes / (time.perf_counter() - started) / 1e6

    async def ping_ms(endpoint: Endpoint) -> float:
        rpc = RpcClient(pool, PROBE, endpoint, peer_id=target["peer_id"], timeout=30)
        await rpc.call("Ping", PingRequest())  # the connection made, not timed
        times = []
        for _ in range(PINGS):
            started = time.perf_counter()
            await rpc.call("Ping", PingRequest())
            times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)

    try:
        await send(direct)  # connections made and warmed up, not timed
        await send(relayed)
        rates: dict[str, list[float]] = {"direct": [], "relayed": []}
        cpu = 0.0
        for _ in range(args.repeats):
            rates["direct"].append(await send(direct))
            before = _cpu_seconds(relay["pid"])
            rates["relayed"].append(await send(relayed))
            cpu += _cpu_seconds(relay["pid"]) - before
        pings = {"direct": await ping_ms(Endpoint.parse(target["grpc"])), "relayed": await ping_ms(relayed)}
    finally:
        await client.close()
        await pool.close()
    mb_per_s = {name: statistics.median(values) for name, values in rates.items()}
    return {
        "mib": args.mib, "repeats": args.repeats, "tls": not args.plaintext,
        "mb_per_s": mb_per_s, "ratio": mb_per_s["relayed"] / mb_per_s["direct"],
        "relay_cpu_s_per_gbit": cpu / (nbytes * 8 * args.repeats / 1e9),
        "reservation_s": target["reserved_s"], "usable_reservation_s": target["usable_s"],
        "ping_ms": pings,
    }


def _start(role: str, *extra: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    process = subprocess.Popen([sys.executable, __file__, "--role", role, *extra], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.kill()
        raise SystemExit(f"relay benchmark: the {role} process did not start")
    return process, json.loads(line)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.stdin is not None:
        process.stdin.close()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="tensor size in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plaintext", action="store_true", help="no TLS (all roles must agree)")
    parser.add_argument("--listen-host", default="127.0.0.1", help="where the relay and target roles listen")
    parser.add_argument("--role", choices=["relay", "target"], help="run one role alone (prints one JSON line)")
    parser.add_argument("--relay", help="target role: the relay's address, peer_id@host:port")
    args = parser.parse_args()
    if args.role == "relay":
        asyncio.run(relay_role(args))
        return
    if args.role == "target":
        asyncio.run(target_role(args))
        return
    common = ["--listen-host", args.listen_host, *(["--plaintext"] if args.plaintext else [])]
    relay, relay_info = _start("relay", *common)
    try:
        target, target_info = _start("target", "--relay", relay_info["relay"], *common)
        try:
            figures = asyncio.run(measure(args, relay_info, target_info))
        finally:
            _stop(target)
    finally:
        _stop(relay)
    rates = figures["mb_per_s"]
    print(f"{args.mib} MiB tensor over loopback, {'TLS' if figures['tls'] else 'plaintext'}, median of {args.repeats}")
    print(f"bulk direct                 {rates['direct']:8.0f} MB/s")
    print(f"bulk through the relay      {rates['relayed']:8.0f} MB/s   ratio to direct {figures['ratio']:.2f}")
    print(f"relay CPU                   {figures['relay_cpu_s_per_gbit']:8.3f} s per Gbit relayed")
    print(f"reservation held / usable   {figures['reservation_s']:8.3f} s / {figures['usable_reservation_s']:.3f} s "
          f"from the target's start")
    print(f"Ping direct / relayed       {figures['ping_ms']['direct']:8.2f} ms / {figures['ping_ms']['relayed']:.2f} ms")
    save("relay", figures)


if __name__ == "__main__":
    main()

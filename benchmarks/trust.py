"""What private runs and TLS cost: call latency and bulk throughput against an open plaintext run.

A server process runs four servers on loopback: open plaintext (the reference), private
(tokens and signed calls), TLS, and private + TLS. This process calls each one: the median
latency of sequential gRPC `Ping`s (one channel, kept open) and the throughput of one tensor
sent to the bulk Sink route (connection made before the clock starts). Prints each figure and
its ratio to the open plaintext reference.
Usage: python benchmarks/trust.py [--pings 500] [--mib 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import percentile
from record import save

KINDS = {"open": {}, "private": {"private": True}, "tls": {"tls": True}, "private+tls": {"private": True, "tls": True}}


def settings(kind: str, folder: Path, name: str, authority: str):  # noqa: ANN201 - WireSettings, imported late
    from apiary.wire import WireSettings

    options = KINDS[kind]
    private = {"run_authority": authority, "access_token": str(folder / f"{name}.token")} if options.get("private") else {}
    return WireSettings(listen_host="127.0.0.1", tls=bool(options.get("tls")), default_timeout=60, **private)


async def serve(folder: Path, authority: str) -> None:
    from apiary.wire import Identity, RpcServer

    identity = Identity.load(folder / "server.key")
    servers = {kind: RpcServer(settings(kind, folder, "server", authority), identity) for kind in KINDS}
    for server in servers.values():
        await server.start()
    print(json.dumps({kind: [s.port, s.bulk.port] for kind, s in servers.items()}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for server in servers.values():
        await server.stop(0)


async def measure(kind: str, ports: list[int], folder: Path, authority: str, pings: int, mib: int,
                  repeats: int) -> tuple[float, float]:
    from apiary.wire import PROBE, ChannelPool, Endpoint, Identity, RpcClient
    from apiary.wire.bulk import BulkClient
    from apiary.wire.probe import SINK_ROUTE
    from apiary.wire.protos.wire_pb2 import PingRequest, SinkRequest, TensorHeader

    me, server_id = Identity.load(folder / "client.key"), Identity.load(folder / "server.key").peer_id
    wire = settings(kind, folder, "client", authority)
    async with ChannelPool(wire, identity=me) as pool:
        client = RpcClient(pool, PROBE, Endpoint("127.0.0.1", ports[0]), peer_id=server_id)
        await client.call("Ping", PingRequest())
        latencies = []
        for _ in range(pings):
            started = time.perf_counter()
            await client.call("Ping", PingRequest())
            latencies.append(time.perf_counter() - started)
    bulk = BulkClient(wire, identity=me)
    payload = memoryview(bytearray(mib << 20))
    header = TensorHeader(dtype="uint8", shape=[len(payload)], nbytes=len(payload))
    endpoint, body = Endpoint("127.0.0.1", ports[1]), SinkRequest(digest=False).SerializeToString()
    await bulk.call(endpoint, SINK_ROUTE, body=body, peer_id=server_id)  # connects (and shakes hands)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        await bulk.call(endpoint, SINK_ROUTE, body=body, tensors=[(header, payload)], peer_id=server_id)
        rates.append(len(payload) / (time.perf_counter() - started) / 1e6)
    await bulk.close()
    return percentile(latencies, 0.5) * 1000, max(rates)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pings", type=int, default=500)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--authority", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        await serve(args.serve, args.authority)
        return
    from apiary.wire import Identity
    from apiary.wire.auth import AccessToken

    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        authority = Identity.generate()
        for peer in ("server", "client"):
            identity = Identity.generate()
            identity.save(folder / f"{peer}.key")
            (folder / f"{peer}.token").write_text(AccessToken.issue(authority, identity.peer_id, 3600).encode())
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(folder), "--authority", authority.peer_id],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            ports = json.loads(server.stdout.readline())  # type: ignore[union-attr]
            results = {kind: await measure(kind, ports[kind], folder, authority.peer_id, args.pings, args.mib, args.repeats)
                       for kind in KINDS}
        finally:
            server.stdin.close()  # type: ignore[union-attr]
            server.wait(30)
    reference_ms, reference_rate = results["open"]
    print(f"{'run':<12} {'Ping median ms':>15} {'ratio':>6} {'bulk MB/s':>10} {'ratio':>6}")
    for kind, (ms, rate) in results.items():
        print(f"{kind:<12} {ms:>15.3f} {ms / reference_ms:>6.2f} {rate:>10.0f} {rate / reference_rate:>6.2f}")
    save("trust", {"pings": args.pings, "mib": args.mib, "repeats": args.repeats,
                   "runs": {kind: {"ping_ms": ms, "bulk_mb_per_s": rate} for kind, (ms, rate) in results.items()}})


if __name__ == "__main__":
    asyncio.run(main())

"""`apiary up`: a local swarm in one process, with no containers.

Starts `--peers` participants on loopback, each with its gRPC server, bulk transport and
admin endpoint; every peer pings every other and sends a tensor to its neighbour over the
bulk transport; the results are printed and the swarm keeps serving until `--duration`
passes or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Annotated

from rich.console import Console
from rich.table import Table

from apiary.cli.options import option
from apiary.services.runtime import ServiceHost, ServiceSettings
from apiary.wire import PROBE, ChannelPool, RpcClient, WireSettings
from apiary.wire.bulk import BulkClient
from apiary.wire.probe import SINK_ROUTE
from apiary.wire.protos.wire_pb2 import PingRequest, TensorHeader

console = Console()


def up_command(
    peers: Annotated[int, option("--peers", "how many local participants to start", min=1, max=64)] = 4,
    duration: Annotated[float, option("--duration", "seconds to keep serving after the checks (0: until Ctrl-C)", min=0)] = 0,
    transfer_mib: Annotated[int, option("--transfer-mib", "MiB each peer sends its neighbour", min=0)] = 64,
) -> None:
    """Run a local swarm: start peers, check they reach each other, keep serving."""
    asyncio.run(_up(peers, duration or None, transfer_mib))


async def _up(count: int, duration: float | None, transfer_mib: int) -> None:
    wire = WireSettings(listen_host="127.0.0.1")
    hosts = [ServiceHost("peer", wire, ServiceSettings()) for _ in range(count)]
    try:
        for host in hosts:
            await host.start()
        with console.status(f"checking {count} peers"):
            rows = await asyncio.gather(*(_check(host, hosts, transfer_mib) for host in hosts))
        table = Table(title=f"apiary local swarm: {count} peers")
        for column in ("peer id", "gRPC port", "admin", "pings ok", "mean rtt", "bulk to next"):
            table.add_column(column, no_wrap=True)
        for host, row in zip(hosts, rows):
            table.add_row(host.identity.peer_id[:10] + "…", str(host.server.port), host.admin.url, *row)
        console.print(table)
        console.print("serving; Ctrl-C stops" if duration is None else f"serving for {duration:.0f} s")
        await _wait_for_stop(duration)
    finally:
        for host in hosts:
            await host.shutdown()


async def _check(host: ServiceHost, hosts: list[ServiceHost], transfer_mib: int) -> tuple[str, str, str]:
    """Pings every other peer, then sends `transfer_mib` MiB to the next one over bulk."""
    others = [other for other in hosts if other is not host]
    rtts = []
    async with ChannelPool(host.server.settings) as pool:
        for other in others:
            started = time.perf_counter()
            reply = await RpcClient(pool, PROBE, other.server.announced, timeout=5).call("Ping", PingRequest())
            if reply.peer_id == other.identity.peer_id:
                rtts.append(time.perf_counter() - started)
    rate = "-"
    if others and transfer_mib:
        target = others[(hosts.index(host)) % len(others)]
        payload = memoryview(bytearray(transfer_mib << 20))
        header = TensorHeader(dtype="uint8", shape=[len(payload)], nbytes=len(payload))
        client = BulkClient(host.server.settings)
        started = time.perf_counter()
        await client.call(target.server.announced_bulk, SINK_ROUTE, tensors=[(header, payload)], timeout=120)
        rate = f"{len(payload) / (time.perf_counter() - started) / 1e6:.0f} MB/s"
        await client.close()
    mean = f"{sum(rtts) / len(rtts) * 1000:.1f} ms" if rtts else "-"
    return f"{len(rtts)}/{len(others)}", mean, rate


async def _wait_for_stop(duration: float | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), duration)
    except asyncio.TimeoutError:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

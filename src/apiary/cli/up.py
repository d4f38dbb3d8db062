"""`apiary up`: a local swarm in one process, with no containers.

Starts `--peers` participants on loopback. Each runs the dht service (a DHT node with its
admin endpoint, local API and bulk transport); the first starts the swarm and the others join
through it. Then every participant pings every other, sends a tensor to its neighbour over
the bulk transport, announces itself under a shared DHT key and reads everyone's
announcements back. The results are printed and the swarm keeps serving until `--duration`
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
from apiary.dht import DHTSettings
from apiary.services.dht import DHTService, DHTServiceSettings
from apiary.services.runtime import ServiceSettings
from apiary.wire import PROBE, ChannelPool, PeerAddress, RpcClient, WireSettings
from apiary.wire.bulk import BulkClient
from apiary.wire.probe import SINK_ROUTE
from apiary.wire.protos.wire_pb2 import PingRequest, TensorHeader

console = Console()
DIRECTORY_KEY = "apiary.up.participants"


def up_command(
    peers: Annotated[int, option("--peers", "how many local participants to start", min=1, max=64)] = 4,
    duration: Annotated[float, option("--duration", "seconds to keep serving after the checks (0: until Ctrl-C)", min=0)] = 0,
    transfer_mib: Annotated[int, option("--transfer-mib", "MiB each peer sends its neighbour", min=0)] = 64,
) -> None:
    """Run a local swarm: start DHT participants, check they reach each other, keep serving."""
    asyncio.run(_up(peers, duration or None, transfer_mib))


def _participant(initial_peers: list[PeerAddress]) -> DHTService:
    return DHTService(
        WireSettings(listen_host="127.0.0.1"),
        ServiceSettings(),
        DHTSettings(),
        DHTServiceSettings(initial_peers=initial_peers),
    )


async def _up(count: int, duration: float | None, transfer_mib: int) -> None:
    participants: list[DHTService] = []
    try:
        with console.status(f"starting {count} participants"):
            participants.append(_participant([]))
            await participants[0].start()
            first = PeerAddress.parse(participants[0].node.address)
            for _ in range(count - 1):
                participants.append(_participant([first]))
                await participants[-1].start()
        with console.status("checking links and the DHT"):
            rows = await asyncio.gather(*(_check(p, participants, transfer_mib) for p in participants))
        table = Table(title=f"apiary local swarm: {count} participants")
        for column in ("peer", "dht port", "admin port", "pings", "rtt", "bulk to next", "directory"):
            table.add_column(column, no_wrap=True)
        for participant, row in zip(participants, rows):
            host = participant.host
            table.add_row(host.identity.peer_id[:6], str(host.server.port), str(host.admin.port), *row)
        console.print(table)
        console.print(f"join this swarm with: apiary dht --initial-peers {first}", soft_wrap=True)
        console.print("serving; Ctrl-C stops" if duration is None else f"serving for {duration:.0f} s")
        await _wait_for_stop(duration)
    finally:
        for participant in participants:
            await participant.host.shutdown()


async def _check(participant: DHTService, everyone: list[DHTService], transfer_mib: int) -> tuple[str, ...]:
    """Pings every other participant, sends `transfer_mib` MiB to the next one over bulk,
    announces itself in the DHT and counts the announcements it can read."""
    host, node = participant.host, participant.node
    others = [other.host for other in everyone if other is not participant]
    rtts = []
    async with ChannelPool(host.server.settings) as pool:
        for other in others:
            started = time.perf_counter()
            reply = await RpcClient(pool, PROBE, other.server.announced, timeout=5).call("Ping", PingRequest())
            if reply.peer_id == other.identity.peer_id:
                rtts.append(time.perf_counter() - started)
    rate = "-"
    if others and transfer_mib:
        target = others[everyone.index(participant) % len(others)]
        payload = memoryview(bytearray(transfer_mib << 20))
        header = TensorHeader(dtype="uint8", shape=[len(payload)], nbytes=len(payload))
        client = BulkClient(host.server.settings)
        started = time.perf_counter()
        await client.call(target.server.announced_bulk, SINK_ROUTE, tensors=[(header, payload)], timeout=120)
        rate = f"{len(payload) / (time.perf_counter() - started) / 1e6:.0f} MB/s"
        await client.close()
    await node.store(DIRECTORY_KEY, {"admin": host.admin.url}, time.time() + 600, subkey=host.identity.peer_id)
    await asyncio.sleep(0.5)  # let everyone announce before reading
    found = await node.get(DIRECTORY_KEY, latest=True)
    seen = len(found.value) if found is not None else 0
    mean = f"{sum(rtts) / len(rtts) * 1000:.1f} ms" if rtts else "-"
    return f"{len(rtts)}/{len(others)}", mean, rate, f"{seen}/{len(everyone)}"


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

"""`apiary version`, `apiary keygen` and `apiary ping`: identity and reachability."""

from __future__ import annotations

import asyncio
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

import apiary
from apiary.cli.options import TlsOption, option
from apiary.wire import PROBE, ChannelPool, Endpoint, Identity, PeerAddress, RpcClient, WireSettings
from apiary.wire.bulk import BulkClient
from apiary.wire.probe import SINK_ROUTE
from apiary.wire.protos.wire_pb2 import PingRequest, TensorHeader

console = Console()


def version_command() -> None:
    """Print the versions of apiary and of what it runs on."""
    table = Table(show_header=False, box=None)
    table.add_row("apiary", apiary.__version__)
    table.add_row("python", platform.python_version())
    for package in ("torch", "grpcio", "protobuf"):
        try:
            table.add_row(package, version(package))
        except PackageNotFoundError:
            table.add_row(package, "not installed")
    console.print(table)


def keygen_command(
    identity: Annotated[Path, option("--identity", "where to write the identity (private key) file")],
    force: Annotated[bool, option("--force", "overwrite an existing identity file")] = False,
) -> None:
    """Create a peer identity file and print its peer id."""
    if identity.exists() and not force:
        existing = Identity.load(identity)
        raise typer.BadParameter(
            f"{identity} already holds peer {existing.peer_id}; pass --force to replace it", param_hint="--identity"
        )
    new = Identity.generate()
    new.save(identity)
    console.print(f"peer id: [bold]{new.peer_id}[/bold]")
    console.print(f"identity file: {identity} (keep it private; it is this peer's key)")


def ping_command(
    address: Annotated[str, typer.Argument(help="the peer: host:port or peer_id@host:port", envvar="APIARY_PEER")],
    timeout: Annotated[float, option("--timeout", "seconds to wait for the answer", min=0.1)] = 5.0,
    bulk_mib: Annotated[int, option("--bulk-mib", "also send this many MiB over the bulk transport", min=0)] = 0,
    tls: TlsOption = True,
) -> None:
    """Ask a peer who it is, how far away it is, and (optionally) how fast the link is."""
    asyncio.run(_ping(PeerAddress.parse(address), timeout, bulk_mib, WireSettings(tls=tls)))


async def _ping(peer: PeerAddress, timeout: float, bulk_mib: int, wire: WireSettings) -> None:
    async with ChannelPool(wire) as pool:
        started = time.perf_counter()
        probe = RpcClient(pool, PROBE, peer.endpoint, timeout=timeout, peer_id=peer.peer_id)
        reply = await probe.call("Ping", PingRequest())
        rtt = time.perf_counter() - started
    if peer.peer_id and reply.peer_id != peer.peer_id:
        raise typer.BadParameter(f"{peer.endpoint} answered as peer {reply.peer_id}, not {peer.peer_id}")
    table = Table(show_header=False, box=None)
    table.add_row("peer id", reply.peer_id)
    table.add_row("address", reply.announced_address)
    table.add_row("bulk address", reply.bulk_address or "none")
    table.add_row("version", reply.version)
    table.add_row("round trip", f"{rtt * 1000:.1f} ms")
    table.add_row("clock offset", f"{(reply.server_time - time.time() + rtt / 2) * 1000:+.1f} ms")
    if bulk_mib and reply.bulk_address:
        payload = memoryview(bytearray(bulk_mib << 20))
        header = TensorHeader(dtype="uint8", shape=[len(payload)], nbytes=len(payload))
        client = BulkClient(wire)
        started = time.perf_counter()
        await client.call(Endpoint.parse(reply.bulk_address), SINK_ROUTE, tensors=[(header, payload)], timeout=600,
                          peer_id=reply.peer_id)
        table.add_row("bulk throughput", f"{len(payload) / (time.perf_counter() - started) / 1e6:.0f} MB/s")
        await client.close()
    console.print(table)

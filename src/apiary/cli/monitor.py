"""`apiary monitor` (the live web page) and `apiary status` (the same in a terminal)."""

from __future__ import annotations

import asyncio
import json as jsonlib
import time
from typing import Annotated, Any, Optional

from rich.console import Console
from rich.table import Table

from apiary.cli.options import AccessTokenOption, RunAuthorityOption, TlsOption, option, require_one_way_to_the_dht
from apiary.monitor.service import MonitorService, open_dht
from apiary.monitor.view import read_swarm, swarm_json
from apiary.wire import Endpoint, WireSettings, parse_peer_list

console = Console(soft_wrap=True)

InitialPeersOption = Annotated[str, option("--initial-peers", "join the DHT as a client through these: "
                                           "peer_id@host:port, comma-separated")]
DhtLocalOption = Annotated[Optional[str], option("--dht-local", "read through this dht service's local API "
                                                 "instead (host:port)")]


def _source(initial_peers: str, dht_local: str | None, tls: bool, run_authority: str | None,
            access_token: str | None) -> tuple[list[Any], Endpoint | None, WireSettings]:
    require_one_way_to_the_dht(dht_local, initial_peers)
    wire = WireSettings(listen_host="127.0.0.1", bulk=False, tls=tls, run_authority=run_authority,
                        access_token=access_token)
    return parse_peer_list(initial_peers), Endpoint.parse(dht_local) if dht_local else None, wire


def monitor_command(
    initial_peers: InitialPeersOption = "",
    dht_local: DhtLocalOption = None,
    admin_host: Annotated[str, option("--admin-host", "interface of the web page (its admin endpoint: also "
                                      "/healthz, /readyz, /status, /metrics)")] = "127.0.0.1",
    admin_port: Annotated[int, option("--admin-port", "port of the web page (0: any free port)")] = 8900,
    refresh: Annotated[float, option("--refresh", "seconds between readings of the swarm", min=0.5)] = 5.0,
    tls: TlsOption = True,
    run_authority: RunAuthorityOption = None,
    access_token: AccessTokenOption = None,
) -> None:
    """Serve a live web page of the swarm: peers, runs, experts, averaging rounds (and /api/... JSON)."""
    asyncio.run(_monitor(*_source(initial_peers, dht_local, tls, run_authority, access_token), admin_host, admin_port,
                         refresh))


async def _monitor(initial_peers: list[Any], dht_local: Endpoint | None, wire: WireSettings, host: str, port: int,
                   refresh: float) -> None:
    dht, close = await open_dht(initial_peers, dht_local, wire)
    try:
        service = MonitorService(dht, host=host, port=port, refresh=refresh)
        await service.run(lambda url: console.print(f"monitor: {url}/", highlight=False))
    finally:
        await close()


def status_command(
    initial_peers: InitialPeersOption = "",
    dht_local: DhtLocalOption = None,
    json: Annotated[bool, option("--json", "print the JSON of the monitor's /api/swarm instead of tables")] = False,
    timeout: Annotated[float, option("--timeout", "seconds each DHT lookup may take", min=0.1)] = 10.0,
    tls: TlsOption = True,
    run_authority: RunAuthorityOption = None,
    access_token: AccessTokenOption = None,
) -> None:
    """Print the swarm once: peers, runs, experts and averaging rounds, as the monitor shows them."""
    swarm = asyncio.run(_status(*_source(initial_peers, dht_local, tls, run_authority, access_token), timeout))
    if json:
        print(jsonlib.dumps(swarm, indent=2))
    else:
        print_swarm(swarm)


async def _status(initial_peers: list[Any], dht_local: Endpoint | None, wire: WireSettings,
                  timeout: float) -> dict[str, Any]:
    dht, close = await open_dht(initial_peers, dht_local, wire)
    try:
        return swarm_json(await read_swarm(dht, timeout=timeout))
    finally:
        await close()


def _age(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"


def print_swarm(swarm: dict[str, Any]) -> None:
    """The swarm as rich tables."""
    peers = swarm["peers"]
    kinds = ", ".join(f"{n} {kind}" for kind, n in peers["by_kind"].items())
    console.print(f"[bold]{peers['count']} peers[/bold] ({kinds or 'none'}) at "
                  f"{time.strftime('%H:%M:%S', time.gmtime(swarm['time']))} UTC", highlight=False)
    table = Table("peer", "kind", "version", "run", "reachability", "uptime", "device", "load", "address")
    for p in peers["peers"]:
        table.add_row(p["peer_id"][:12], p["kind"], p["version"], p["run"] or "", p["reachability"],
                      _age(p["uptime_seconds"]), p["device"], f"{p['load']:.2f}", p["addresses"][0] if p["addresses"] else "")
    console.print(table)
    for run in swarm["runs"]["runs"]:
        loss = f"{run['loss']:.4f}" if run["loss"] is not None else "—"
        table = Table("peer", "epoch", "samples", "samples/s", title=(
            f"run {run['run']}: epoch {run['epoch']}, {run['samples_per_second']:.1f} samples/s, loss {loss}, "
            f"{run['peers']} peers"))
        for entry in run["leaderboard"]:
            table.add_row(entry["peer_id"][:12], str(entry["epoch"]), str(entry["samples"]),
                          f"{entry['samples_per_second']:.1f}")
        console.print(table)
    if swarm["experts"]["grids"]:
        table = Table("grid", "experts", "declared", "servers", title="experts")
        for grid in swarm["experts"]["grids"]:
            table.add_row(grid["prefix"], str(len(grid["experts"])), str(grid["declared"]), str(grid["servers"]))
        console.print(table)
    for run in swarm["rounds"]["runs"]:
        table = Table("finished", "averager", "result", "group", "seconds", "bytes", title=(
            f"rounds of {run['run']}: {run['averagers']} averagers, "
            + ", ".join(f"{k} {v}" for k, v in sorted(run["results"].items()))))
        for r in run["rounds"][:10]:
            table.add_row(time.strftime("%H:%M:%S", time.gmtime(r["finished_at"])), r["peer_id"][:12], r["result"],
                          str(r["group_size"]), f"{r['seconds']:.2f}", str(r["bytes"]))
        console.print(table)

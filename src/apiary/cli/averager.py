"""`apiary averager`: run this participant's averager (torch is imported only when it runs)."""

from __future__ import annotations

import asyncio
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console

from apiary.cli.options import (
    AccessTokenOption, AdminHostOption, AdminPortOption, IdentityOption, MaxBytesInFlightOption,
    MaxBytesInFlightPerPeerOption, MaxTensorBytesOption, OtlpEndpointOption, RunAuthorityOption, StreamStallTimeoutOption,
    ReachabilityOption, ReachabilityPeriodOption, RelayOption, RelayPortOption, RelaysOption, TlsOption, TracingOption,
    option, reachability_settings, relay_fields, require_one_way_to_the_dht, service_settings, transfer_limits,
    with_relay_limits
)
from apiary.services.host import ServiceSettings
from apiary.services.reachability import ReachabilityMode
from apiary.wire import Endpoint, WireSettings, parse_peer_list

if TYPE_CHECKING:
    from apiary.averaging.averager import AveragerSettings
    from apiary.services.averager import AveragerServiceSettings

console = Console(soft_wrap=True)


class AggregationRule(str, Enum):  # apiary.averaging.aggregation.Aggregation, without importing torch
    mean = "mean"
    centered_clip = "centered_clip"
    trimmed_mean = "trimmed_mean"


class AveragingRole(str, Enum):  # apiary.averaging.spans.Role, without importing torch for --help
    node = "node"
    client = "client"
    aux = "aux"


@with_relay_limits
def averager_command(
    run_id: Annotated[str, option("--run-id", "the run's name: averagers of one run average together")],
    mode: Annotated[AveragingRole, option("--mode", "node; client (behind NAT: sends only); aux (reduces only)")] = AveragingRole.node,
    target_group_size: Annotated[int, option("--target-group-size", "peers per averaging group", min=1)] = 16,
    min_group_size: Annotated[int, option("--min-group-size", "fewest peers that make a group", min=1)] = 2,
    expected_peers: Annotated[int, option("--expected-peers", "swarm size the Moshpit grid is shaped for", min=1)] = 16,
    codec: Annotated[str, option("--codec", "compression of the gradient rounds' parts: none, float16, scaled_float16, uniform8, blockwise8, quantile8, adaptive (by the part's size)")] = "none",
    state_codec: Annotated[Optional[str], option("--state-codec", "compression of the state rounds' parts (parameters, optimizer statistics), a --codec value (default: as --codec)")] = None,
    download_codec: Annotated[str, option("--download-codec", "compression of the state sent to newcomers, a --codec value (checksummed after decoding)")] = "none",
    bandwidth: Annotated[float, option("--bandwidth", "declared link bandwidth, bytes/s (sets this peer's share)", min=1)] = 1e8,
    gather_seconds: Annotated[float, option("--gather-seconds", "seconds a round collects announcements", min=0.01)] = 2.0,
    join_seconds: Annotated[float, option("--join-seconds", "seconds a leader waits for its group to join", min=0.01)] = 3.0,
    round_timeout: Annotated[float, option("--round-timeout", "deadline of one round's all-reduce, seconds", min=0.1)] = 60.0,
    sender_timeout: Annotated[float, option("--sender-timeout", "seconds a reducer waits for a sender's part", min=0.1)] = 10.0,
    aggregation: Annotated[AggregationRule, option("--aggregation", "how a reducer combines parts: mean; centered_clip or trimmed_mean (robust to outliers)")] = AggregationRule.mean,
    clip_radius: Annotated[float, option("--clip-radius", "centered_clip: norm each part's offset from the centre is clipped to")] = 1.0,
    clip_iterations: Annotated[int, option("--clip-iterations", "centered_clip: most iterations per span", min=1)] = 20,
    trim_fraction: Annotated[float, option("--trim-fraction", "trimmed_mean: share of the weight cut from each end, in [0, 0.5)")] = 0.1,
    verify_reductions: Annotated[bool, option("--verify-reductions/--trust-reducers", "sign parts, audit the spans others reduce for us, recompute and ban reducers caught lying")] = False,
    audit_blocks: Annotated[int, option("--audit-blocks", "verification: blocks of 1024 values audited per span", min=1)] = 4,
    rejoin_weight: Annotated[float, option("--rejoin-weight", "factor on the weight of a round after missed rounds, in (0, 1]: 1 for gradients; 0.01 for Moshpit parameter averaging (a returning peer all but adopts its group's average)")] = 1.0,
    dht_local: Annotated[Optional[str], option("--dht-local", "local API of this participant's dht service, host:port")] = None,
    initial_peers: Annotated[str, option("--initial-peers", "run an embedded DHT node joining these: peer_id@host:port, comma-separated")] = "",
    host: Annotated[str, option("--host", "interface the public ports bind")] = "0.0.0.0",
    port: Annotated[int, option("--port", "public gRPC port: matchmaking (0: any free port)")] = 0,
    announce_host: Annotated[Optional[str], option("--announce-host", "host other peers dial (default: this host's address)")] = None,
    announce_port: Annotated[Optional[int], option("--announce-port", "gRPC port other peers dial (default: the bound port)")] = None,
    bulk_port: Annotated[int, option("--bulk-port", "public bulk port: all-reduce and state transfer (0: any free port)")] = 0,
    announce_bulk_port: Annotated[Optional[int], option("--announce-bulk-port", "bulk port other peers dial (default: the bound port)")] = None,
    max_requests_per_second: Annotated[float, option("--max-requests-per-second", "requests a peer (host) may make per second on the public ports", min=0.001)] = 1000.0,
    request_burst: Annotated[int, option("--request-burst", "requests a peer may make at once above its rate", min=1)] = 2000,
    max_concurrent_per_peer: Annotated[int, option("--max-concurrent-per-peer", "calls a peer may have in flight at once", min=1)] = 256,
    max_bulk_connections_per_peer: Annotated[int, option("--max-bulk-connections-per-peer", "bulk connections a peer may keep open", min=1)] = 128,
    max_tensor_bytes: MaxTensorBytesOption = 1 << 30,  # the largest span part (and the trainer's tensors, locally)
    max_bytes_in_flight: MaxBytesInFlightOption = 4 << 30,
    max_bytes_in_flight_per_peer: MaxBytesInFlightPerPeerOption = None,
    stream_stall_timeout: StreamStallTimeoutOption = 30.0,
    local_host: Annotated[str, option("--local-host", "interface of the local API for the trainer")] = "127.0.0.1",
    local_port: Annotated[int, option("--local-port", "port of the local API (0: any free port)")] = 0,
    announce_period: Annotated[float, option("--announce-period", "seconds between announcements of the state held", min=0.1)] = 30.0,
    state_timeout: Annotated[float, option("--state-timeout", "seconds a newcomer's LoadState may take", min=0.1)] = 60.0,
    state_path: Annotated[Optional[Path], option("--state-path", "file that keeps the latest state across restarts")] = None,
    max_downloads: Annotated[int, option("--max-downloads", "newcomers this averager sends its state to at once (others are told Busy and try another donor)", min=1)] = 4,
    admin_host: AdminHostOption = "127.0.0.1",
    admin_port: AdminPortOption = 0,
    identity: IdentityOption = None,
    tracing: TracingOption = "none",
    otlp_endpoint: OtlpEndpointOption = None,
    tls: TlsOption = True,
    run_authority: RunAuthorityOption = None,
    access_token: AccessTokenOption = None,
    reachability: ReachabilityOption = ReachabilityMode.AUTO,
    relays: RelaysOption = 2,
    reachability_period: ReachabilityPeriodOption = 300.0,
    relay: RelayOption = False,
    relay_port: RelayPortOption = 0,
    relay_limits: Optional[dict[str, Any]] = None,  # the flags of with_relay_limits
) -> None:
    """Run an averager: average the trainer's tensors with the swarm; keep and serve the latest state."""
    require_one_way_to_the_dht(dht_local, initial_peers)
    if min_group_size > target_group_size:
        raise typer.BadParameter(f"{min_group_size} is above --target-group-size {target_group_size}",
                                 param_hint="'--min-group-size'")
    if not 0 < rejoin_weight <= 1:
        raise typer.BadParameter(f"{rejoin_weight} is not in (0, 1]", param_hint="'--rejoin-weight'")
    if reachability is ReachabilityMode.CLIENT and mode.value == "aux":
        raise typer.BadParameter("an aux averager reduces others' parts: it cannot be in client mode",
                                 param_hint="'--reachability'")
    from apiary.averaging.aggregation import Aggregation
    from apiary.averaging.averager import AveragerSettings
    from apiary.averaging.compression.selection import codec_names
    from apiary.averaging.spans import Role
    from apiary.services.averager import AveragerServiceSettings

    for flag, name in [("--codec", codec), ("--state-codec", state_codec), ("--download-codec", download_codec)]:
        if name is not None and name not in codec_names():
            raise typer.BadParameter(f"unknown codec {name!r} (known: {', '.join(codec_names())})", param_hint=f"'{flag}'")
    settings = (
        WireSettings(listen_host=host, port=port, announce_host=announce_host, announce_port=announce_port,
                     bulk=True, bulk_port=bulk_port, announce_bulk_port=announce_bulk_port,
                     max_requests_per_second=max_requests_per_second, request_burst=request_burst,
                     max_concurrent_per_peer=max_concurrent_per_peer,
                     max_bulk_connections_per_peer=max_bulk_connections_per_peer,
                     tls=tls, run_authority=run_authority, access_token=access_token,
                     **relay_fields(relay, relay_port, relay_limits),
                     **transfer_limits(max_tensor_bytes, max_bytes_in_flight, max_bytes_in_flight_per_peer,
                                       stream_stall_timeout)),
        service_settings(identity, admin_host, admin_port, tracing, otlp_endpoint,
                         reachability_settings(reachability, relays, reachability_period)),
        AveragerSettings(
            prefix=run_id, mode=Role(mode.value), target_group_size=target_group_size, min_group_size=min_group_size,
            expected_peers=expected_peers, bandwidth=bandwidth, codec=codec, state_codec=state_codec,
            download_codec=download_codec, gather_seconds=gather_seconds, join_seconds=join_seconds,
            sender_timeout=sender_timeout, round_timeout=round_timeout,
            aggregation=Aggregation(aggregation.value), clip_radius=clip_radius, clip_iterations=clip_iterations,
            trim_fraction=trim_fraction, verify_reductions=verify_reductions, audit_blocks=audit_blocks,
            rejoin_weight=rejoin_weight,
        ),
        AveragerServiceSettings(
            dht_local=Endpoint.parse(dht_local) if dht_local is not None else None,
            initial_peers=parse_peer_list(initial_peers), local_host=local_host, local_port=local_port,
            announce_period=announce_period, state_timeout=state_timeout, state_path=state_path,
            max_downloads=max_downloads,
        ),
    )
    asyncio.run(_serve(*settings))


async def _serve(wire: WireSettings, service_settings: ServiceSettings, averaging: AveragerSettings,
                 settings: AveragerServiceSettings) -> None:
    from apiary.services.averager import AveragerService

    service = AveragerService(wire, service_settings, averaging, settings)  # grpc.aio objects need the running loop
    await service.start()
    host = service.host
    console.print(f"averaging run {averaging.prefix!r} as {averaging.mode.value}; peer id {host.identity.peer_id}",
                  highlight=False)
    if service.node is not None:
        joined = f"embedded DHT node, {len(service.node.routing)} neighbours"
        console.print(f"DHT: {joined}; others join with: --initial-peers {service.node.address}" if service.node.address
                      else f"DHT: {joined} (client mode)", highlight=False)
    else:
        console.print(f"DHT: the dht service at {settings.dht_local}", highlight=False)
    console.print(f"public: {host.server.announced} (bulk {host.server.announced_bulk})", highlight=False)
    console.print(f"local API: {service.local_endpoint}   admin: {host.admin.url}", highlight=False)
    await host.run()

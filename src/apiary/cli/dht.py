"""`apiary dht`: run this participant's DHT node."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Optional

from rich.console import Console

from apiary.cli.options import (
    AccessTokenOption, AdminHostOption, AdminPortOption, IdentityOption, MaxBytesInFlightOption,
    MaxBytesInFlightPerPeerOption, MaxTensorBytesOption, OtlpEndpointOption, RunAuthorityOption, StreamStallTimeoutOption,
    ReachabilityOption, ReachabilityPeriodOption, RelayOption, RelayPortOption, RelaysOption, TlsOption, TracingOption,
    option, reachability_settings, relay_fields, service_settings, transfer_limits, NewSwarmOption,
    require_join_or_new_swarm, with_relay_limits
)
from apiary.dht import DHTSettings
from apiary.services.dht import DHTService, DHTServiceSettings
from apiary.services.host import ServiceSettings
from apiary.services.reachability import ReachabilityMode
from apiary.wire import WireSettings, parse_peer_list

console = Console(soft_wrap=True)


@with_relay_limits
def dht_command(
    initial_peers: Annotated[str, option("--initial-peers", "peers to join through: peer_id@host:port, comma-separated")] = "",
    new_swarm: NewSwarmOption = False,
    host: Annotated[str, option("--host", "interface the public DHT port binds")] = "0.0.0.0",
    port: Annotated[int, option("--port", "public DHT port (0: any free port)")] = 0,
    announce_host: Annotated[Optional[str], option("--announce-host", "host other peers dial (default: this host's address)")] = None,
    announce_port: Annotated[Optional[int], option("--announce-port", "port other peers dial (default: the bound port)")] = None,
    client_mode: Annotated[bool, option("--client-mode", "behind NAT: get and store, accept no connections")] = False,
    redis_url: Annotated[Optional[str], option("--redis-url", "keep records in Redis, e.g. redis://localhost:6379/0")] = None,
    monitor: Annotated[bool, option("--monitor", "serve the swarm monitor (web page and /api/...) at /monitor/ of the admin endpoint")] = False,
    identity: IdentityOption = None,
    local_host: Annotated[str, option("--local-host", "interface of the local API")] = "127.0.0.1",
    local_port: Annotated[int, option("--local-port", "port of the local API (0: any free port)")] = 0,
    admin_host: AdminHostOption = "127.0.0.1",
    admin_port: AdminPortOption = 0,
    tracing: TracingOption = "none",
    otlp_endpoint: OtlpEndpointOption = None,
    bucket_size: Annotated[int, option("--bucket-size", "nodes per k-bucket")] = 20,
    num_replicas: Annotated[int, option("--num-replicas", "nodes that store each value")] = 5,
    bootstrap_timeout: Annotated[float, option("--bootstrap-timeout", "seconds to reach an initial peer")] = 15.0,
    tls: TlsOption = True,
    run_authority: RunAuthorityOption = None,
    access_token: AccessTokenOption = None,
    max_tensor_bytes: MaxTensorBytesOption = 64 << 10,  # a DHT node receives tensors only to probe links
    max_bytes_in_flight: MaxBytesInFlightOption = 16 << 20,
    max_bytes_in_flight_per_peer: MaxBytesInFlightPerPeerOption = None,
    stream_stall_timeout: StreamStallTimeoutOption = 30.0,
    reachability: ReachabilityOption = ReachabilityMode.AUTO,
    relays: RelaysOption = 2,
    reachability_period: ReachabilityPeriodOption = 300.0,
    relay: RelayOption = False,
    relay_port: RelayPortOption = 0,
    relay_limits: Optional[dict[str, Any]] = None,  # the flags of with_relay_limits
) -> None:
    """Run a DHT node: the swarm's directory of peers, experts, groups and progress."""
    require_join_or_new_swarm(initial_peers, new_swarm)
    settings = (
        WireSettings(listen_host=host, port=port, announce_host=announce_host, announce_port=announce_port, bulk=False,
                     tls=tls, run_authority=run_authority, access_token=access_token,
                     **relay_fields(relay, relay_port, relay_limits),
                     **transfer_limits(max_tensor_bytes, max_bytes_in_flight, max_bytes_in_flight_per_peer,
                                       stream_stall_timeout)),
        service_settings(identity, admin_host, admin_port, tracing, otlp_endpoint,
                         reachability_settings(reachability, relays, reachability_period)),
        DHTSettings(bucket_size=bucket_size, num_replicas=num_replicas, client_mode=client_mode,
                    bootstrap_timeout=bootstrap_timeout),
        DHTServiceSettings(initial_peers=parse_peer_list(initial_peers), redis_url=redis_url,
                           local_host=local_host, local_port=local_port, monitor=monitor),
    )
    asyncio.run(_serve(*settings))


async def _serve(
    wire: WireSettings, service_settings: ServiceSettings, dht: DHTSettings, settings: DHTServiceSettings
) -> None:
    service = DHTService(wire, service_settings, dht, settings)  # grpc.aio objects need the running loop
    await service.start()
    node = service.node
    if node.address:
        console.print(f"others join with: [bold]--initial-peers {node.address}[/bold]")
    else:
        console.print("client mode: this node accepts no connections")
    console.print(f"peer id {node.identity.peer_id}; {len(node.routing)} neighbours")
    console.print(f"local API: {service.local_endpoint}   admin: {service.host.admin.url}", highlight=False)
    if settings.monitor:
        console.print(f"monitor: {service.host.admin.url}/monitor/", highlight=False)
    await service.host.run()

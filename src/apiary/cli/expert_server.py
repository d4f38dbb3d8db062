"""`apiary expert-server`: host experts that trainers anywhere in the swarm call (torch is
imported only when it runs)."""

from __future__ import annotations

import asyncio
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
    from apiary.services.expert_server import ExpertServerSettings

console = Console(soft_wrap=True)


@with_relay_limits
def expert_server_command(
    experts: Annotated[Optional[str], option("--experts", "experts to host, as grid patterns: ffn.0.[0:4] = ffn.0.0 … ffn.0.3; comma-separated (default: the --task's grid)")] = None,
    task: Annotated[Optional[str], option("--task", "host the experts of this built-in task's grid: moe_lm[:PRESET] (fills --experts, --hidden-size and --kind when not given)")] = None,
    num_experts: Annotated[Optional[int], option("--num-experts", "host this many of the experts --experts names, chosen among those no other server declares in the DHT (default: all)", min=1)] = None,
    kind: Annotated[Optional[str], option("--kind", "ffn, transformer, slow or failing (for tests), or package.module:factory (default: ffn, or the --task's)")] = None,
    hidden_size: Annotated[Optional[int], option("--hidden-size", "the experts' input and output size (default: 1024, or the --task's)", min=1)] = None,
    optimizer: Annotated[str, option("--optimizer", "every expert's optimizer: adam, adamw, sgd or none (experts never change)")] = "adam",
    lr: Annotated[float, option("--lr", "learning rate of every expert", min=0)] = 1e-3,
    momentum: Annotated[float, option("--momentum", "SGD momentum", min=0)] = 0.0,
    weight_decay: Annotated[float, option("--weight-decay", "weight decay (decoupled for adamw)", min=0)] = 0.0,
    dtype: Annotated[str, option("--dtype", "the experts' compute dtype, also carried on the wire: float32, bfloat16 or float16 (half the bytes)")] = "float32",
    max_grad_norm: Annotated[Optional[float], option("--max-grad-norm", "clip each expert's gradient to this norm (default: no clipping)")] = None,
    scheduler: Annotated[str, option("--scheduler", "learning rate after warm-up: constant, or linear or cosine decay to 0 at --total-steps")] = "constant",
    warmup_steps: Annotated[int, option("--warmup-steps", "updates of linear learning-rate warm-up per expert", min=0)] = 0,
    total_steps: Annotated[Optional[int], option("--total-steps", "updates per expert after which linear or cosine decay reach 0", min=1)] = None,
    max_batch_size: Annotated[int, option("--max-batch-size", "most samples in one batch (larger requests are refused)", min=1)] = 1024,
    max_wait: Annotated[float, option("--max-wait", "seconds a request waits for others to join its batch", min=0)] = 0.005,
    max_queued_requests: Annotated[int, option("--max-queued-requests", "requests that may wait per expert and method", min=1)] = 1024,
    kept_activations: Annotated[int, option("--kept-activations", "forward passes whose activations wait for their backward, so it need not recompute them (0: none)", min=0)] = 64,
    kept_activations_seconds: Annotated[float, option("--kept-activations-seconds", "seconds kept activations wait for their backward", min=0.1)] = 30.0,
    device: Annotated[str, option("--device", "auto (CUDA when present), cpu, cuda or cuda:N")] = "auto",
    checkpoint_dir: Annotated[Optional[Path], option("--checkpoint-dir", "keep every expert's checkpoint here; loaded at start")] = None,
    checkpoint_period: Annotated[float, option("--checkpoint-period", "seconds between checkpoints (also saved at shutdown)", min=0.1)] = 300.0,
    declare_period: Annotated[float, option("--declare-period", "seconds between declarations in the DHT (each lives 3 periods)", min=0.1)] = 30.0,
    slow_seconds: Annotated[float, option("--slow-seconds", "delay of every pass of the `slow` test kind", min=0)] = 1.0,
    dht_local: Annotated[Optional[str], option("--dht-local", "local API of this participant's dht service, host:port")] = None,
    initial_peers: Annotated[str, option("--initial-peers", "run an embedded DHT node joining these: peer_id@host:port, comma-separated")] = "",
    host: Annotated[str, option("--host", "interface the public port binds")] = "0.0.0.0",
    port: Annotated[int, option("--port", "public gRPC port: expert calls (0: any free port)")] = 0,
    announce_host: Annotated[Optional[str], option("--announce-host", "host trainers dial (default: this host's address)")] = None,
    announce_port: Annotated[Optional[int], option("--announce-port", "port trainers dial (default: the bound port)")] = None,
    admin_host: AdminHostOption = "127.0.0.1",
    admin_port: AdminPortOption = 0,
    identity: IdentityOption = None,
    tracing: TracingOption = "none",
    otlp_endpoint: OtlpEndpointOption = None,
    tls: TlsOption = True,
    run_authority: RunAuthorityOption = None,
    access_token: AccessTokenOption = None,
    max_tensor_bytes: MaxTensorBytesOption = 64 << 20,  # a batch of activations or gradients
    max_bytes_in_flight: MaxBytesInFlightOption = 512 << 20,
    max_bytes_in_flight_per_peer: MaxBytesInFlightPerPeerOption = None,
    stream_stall_timeout: StreamStallTimeoutOption = 30.0,
    reachability: ReachabilityOption = ReachabilityMode.AUTO,
    relays: RelaysOption = 2,
    reachability_period: ReachabilityPeriodOption = 300.0,
    relay: RelayOption = False,
    relay_port: RelayPortOption = 0,
    relay_limits: Optional[dict[str, Any]] = None,  # the flags of with_relay_limits
) -> None:
    """Run an expert server: host experts, train them on the requests that reach them, declare them in the DHT."""
    require_one_way_to_the_dht(dht_local, initial_peers)
    if reachability is ReachabilityMode.CLIENT:
        raise typer.BadParameter("an expert server has no client mode: trainers dial it (auto, public or relayed)",
                                 param_hint="'--reachability'")
    from apiary.moe.checkpoints import CheckpointError
    from apiary.moe.claiming import NoFreeExperts
    from apiary.moe.names import expand_expert_names
    from apiary.services.expert_server import ExpertServerSettings

    experts, hidden_size, kind = _experts_to_host(experts, task, hidden_size, kind)
    try:
        names = expand_expert_names(experts)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="'--experts'") from None
    settings = (
        WireSettings(listen_host=host, port=port, announce_host=announce_host, announce_port=announce_port, bulk=False,
                     tls=tls, run_authority=run_authority, access_token=access_token,
                     **relay_fields(relay, relay_port, relay_limits),
                     **transfer_limits(max_tensor_bytes, max_bytes_in_flight, max_bytes_in_flight_per_peer,
                                       stream_stall_timeout)),
        service_settings(identity, admin_host, admin_port, tracing, otlp_endpoint,
                         reachability_settings(reachability, relays, reachability_period)),
        ExpertServerSettings(
            experts=names, num_experts=num_experts, kind=kind, hidden_size=hidden_size, dtype=dtype, optimizer=optimizer,
            lr=lr, momentum=momentum,
            weight_decay=weight_decay, max_grad_norm=max_grad_norm, scheduler=scheduler, warmup_steps=warmup_steps,
            total_steps=total_steps, slow_seconds=slow_seconds, max_batch_size=max_batch_size, max_wait=max_wait,
            max_queued_requests=max_queued_requests, kept_activations=kept_activations,
            kept_activations_seconds=kept_activations_seconds, device=device, checkpoint_dir=checkpoint_dir,
            checkpoint_period=checkpoint_period, declare_period=declare_period,
            dht_local=Endpoint.parse(dht_local) if dht_local is not None else None,
            initial_peers=parse_peer_list(initial_peers),
        ),
    )
    try:
        asyncio.run(_serve(*settings))
    except CheckpointError as e:
        raise typer.BadParameter(str(e), param_hint="'--checkpoint-dir'") from None
    except NoFreeExperts as e:
        raise typer.BadParameter(str(e), param_hint="'--num-experts'") from None


def _experts_to_host(experts: str | None, task: str | None, hidden_size: int | None, kind: str | None
                     ) -> tuple[str, int, str]:
    """--experts, --hidden-size and --kind, those not given taken from the --task's expert grid."""
    if task is None:
        if experts is None:
            raise typer.BadParameter("name the experts to host (or --task, whose grid names them)",
                                     param_hint="'--experts'")
        return experts, hidden_size or 1024, kind or "ffn"
    from apiary.tasks import TaskError, task_expert_grid

    try:
        grid = task_expert_grid(task)
    except TaskError as e:
        raise typer.BadParameter(str(e), param_hint="'--task'") from None
    return experts or grid.patterns, hidden_size or grid.hidden_size, kind or grid.kind


async def _serve(wire: WireSettings, service_settings: ServiceSettings, settings: ExpertServerSettings) -> None:
    from apiary.services.expert_server import ExpertServerService

    service = ExpertServerService(wire, service_settings, settings)  # grpc.aio objects need the running loop
    await service.start()
    host = service.host
    console.print(f"hosting {len(service.server.experts)} {settings.kind} experts of hidden size {settings.hidden_size} "
                  f"in {settings.dtype} "
                  f"on {service.device}; peer id {host.identity.peer_id}", highlight=False)
    if settings.num_experts is not None:
        console.print(f"chosen among the {len(settings.experts)} named, free in the DHT: "
                      f"{', '.join(service.server.experts)}", highlight=False)
    if service.node is not None:
        console.print(f"DHT: embedded node, {len(service.node.routing)} neighbours; others join with: "
                      f"--initial-peers {service.node.address}", highlight=False)
    else:
        console.print(f"DHT: the dht service at {settings.dht_local}", highlight=False)
    console.print(f"experts served at: {service.address}   admin: {host.admin.url}", highlight=False)
    await host.run()

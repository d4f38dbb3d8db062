"""`apiary trainer`: train a task with the swarm (torch is imported only when it runs)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from apiary.cli.options import (
    AccessTokenOption, AdminHostOption, AdminPortOption, IdentityOption, NewSwarmOption, OtlpEndpointOption,
    ReachabilityOption, ReachabilityPeriodOption, RelayOption, RelayPortOption, RelaysOption, RunAuthorityOption,
    TlsOption, TracingOption, option, reachability_settings, relay_fields, require_join_or_new_swarm, service_settings,
    with_relay_limits
)
from apiary.services.host import ServiceSettings
from apiary.services.reachability import ReachabilityMode
from apiary.wire import Endpoint, WireSettings, parse_peer_list

console = Console(soft_wrap=True)


def _json_object(text: str, flag: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"not JSON: {e}", param_hint=f"'{flag}'") from None
    if not isinstance(value, dict):
        raise typer.BadParameter("must be a JSON object", param_hint=f"'{flag}'")
    return value


def _gpus(text: str) -> int | list[int]:
    """--gpus: a count of local ranks ("2"), CUDA device ids ("0,1") or "all" (every CUDA device)."""
    if text.strip() == "all":
        import torch

        if not torch.cuda.device_count():
            raise typer.BadParameter("'all' GPUs were asked for, but torch sees no CUDA device", param_hint="'--gpus'")
        return torch.cuda.device_count()
    try:
        return [int(part) for part in text.split(",")] if "," in text else int(text)
    except ValueError:
        raise typer.BadParameter(f"a count of GPUs (e.g. 2), CUDA device ids (e.g. 0,1) or all, got {text!r}",
                                 param_hint="'--gpus'") from None


@with_relay_limits
def trainer_command(
    run_id: Annotated[str, option("--run-id", "the run's name: trainers of one run train together")],
    task: Annotated[str, option("--task", "package.module:factory, or a built-in task: charlm")] = "charlm",
    task_options: Annotated[str, option("--task-options", "JSON object of keyword settings for the task's factory")] = "",
    seed: Annotated[int, option("--seed", "this peer's data seed")] = 0,
    target_batch_size: Annotated[int, option("--target-batch-size", "samples the swarm accumulates per epoch", min=1)] = 256,
    mode: Annotated[str, option("--mode", "gradients, local, diloco or powersgd")] = "gradients",
    average_state_every: Annotated[int, option("--average-state-every", "epochs between state averaging rounds (0: never)", min=0)] = 5,
    delay_updates: Annotated[bool, option("--delay-updates", "overlap gradient averaging with the next batches")] = False,
    delay_state_averaging: Annotated[bool, option("--delay-state-averaging", "overlap state averaging with the next batches (gradients or powersgd mode)")] = False,
    reuse_grad_buffers: Annotated[bool, option("--reuse-grad-buffers", "accumulate in the gradients themselves: no separate buffer (gradients mode)")] = False,
    offload_optimizer: Annotated[bool, option("--offload-optimizer", "keep the optimizer's state and update on the CPU (gradients mode)")] = False,
    outer_lr: Annotated[float, option("--outer-lr", "DiLoCo's outer learning rate", min=0)] = 0.7,
    outer_momentum: Annotated[float, option("--outer-momentum", "DiLoCo's outer Nesterov momentum", min=0, max=0.999)] = 0.9,
    powersgd_rank: Annotated[int, option("--powersgd-rank", "PowerSGD's rank of the gradients' factors (powersgd mode)", min=1)] = 4,
    powersgd_min_size: Annotated[int, option("--powersgd-min-size", "PowerSGD: tensors with fewer elements are averaged uncompressed", min=0)] = 4096,
    client_mode: Annotated[bool, option("--client-mode", "behind NAT: dial out only (embedded services)")] = False,
    auxiliary: Annotated[bool, option("--auxiliary", "do not train: lend bandwidth to the swarm's gradient rounds")] = False,
    progress_every: Annotated[float, option("--progress-every", "seconds between progress lines", min=0.1)] = 10.0,
    dht_local: Annotated[Optional[str], option("--dht-local", "local API of this participant's dht service, host:port")] = None,
    averager_local: Annotated[Optional[str], option("--averager-local", "local API of this participant's averager, host:port")] = None,
    initial_peers: Annotated[Optional[str], option("--initial-peers", "embedded dht and averager joining these: peer_id@host:port, comma-separated")] = None,
    new_swarm: NewSwarmOption = False,
    averaging: Annotated[str, option("--averaging", "JSON object of embedded averager settings (codec, gather_seconds, ...)")] = "",
    min_peers: Annotated[int, option("--min-peers", "wait until the run has this many peers before training", min=1)] = 1,
    min_peers_timeout: Annotated[float, option("--min-peers-timeout", "seconds to wait for --min-peers", min=1)] = 300.0,
    max_epochs: Annotated[int, option("--max-epochs", "stop at this swarm epoch (0: no limit)", min=0)] = 0,
    max_seconds: Annotated[float, option("--max-seconds", "stop after this many seconds of training (0: no limit)", min=0)] = 0,
    device: Annotated[str, option("--device", "auto (cuda when present), cpu or cuda[:N]")] = "auto",
    gpus: Annotated[str, option("--gpus", "local trainer ranks, one per GPU, reduced together before the swarm: a count (ranks on cuda:0.. when CUDA has them, else CPU), CUDA device ids (e.g. 0,1) or all")] = "1",
    threads: Annotated[int, option("--threads", "torch intra-op threads (0: torch's default)", min=0)] = 0,
    checkpoint_dir: Annotated[Optional[Path], option("--checkpoint-dir", "keep the optimizer's state here across restarts")] = None,
    checkpoint_period: Annotated[float, option("--checkpoint-period", "seconds between checkpoints", min=1)] = 300.0,
    summary_path: Annotated[Optional[Path], option("--summary-path", "write a JSON summary here when training stops")] = None,
    evaluate_every: Annotated[float, option("--evaluate-every", "seconds between held-out evaluations", min=1)] = 30.0,
    host: Annotated[str, option("--host", "interface the embedded services' public ports bind")] = "0.0.0.0",
    tls: TlsOption = True,
    run_authority: RunAuthorityOption = None,
    access_token: AccessTokenOption = None,
    admin_host: AdminHostOption = "127.0.0.1",
    admin_port: AdminPortOption = 0,
    identity: IdentityOption = None,
    tracing: TracingOption = "none",
    otlp_endpoint: OtlpEndpointOption = None,
    reachability: ReachabilityOption = ReachabilityMode.AUTO,
    relays: RelaysOption = 2,
    reachability_period: ReachabilityPeriodOption = 300.0,
    relay: RelayOption = False,
    relay_port: RelayPortOption = 0,
    relay_limits: Optional[dict[str, Any]] = None,  # the flags of with_relay_limits
) -> None:
    """Run a trainer: train a task with the swarm through the collaborative optimizer."""
    from apiary.services.trainer import TrainerSettings

    settings = TrainerSettings(
        run_id=run_id, task=task, task_options=_json_object(task_options, "--task-options"), seed=seed,
        target_batch_size=target_batch_size, mode=mode, average_state_every=average_state_every,
        delay_updates=delay_updates, reuse_grad_buffers=reuse_grad_buffers, offload_optimizer=offload_optimizer,
        delay_state_averaging=delay_state_averaging,
        outer_lr=outer_lr, outer_momentum=outer_momentum, powersgd_rank=powersgd_rank, powersgd_min_size=powersgd_min_size,
        client_mode=client_mode, auxiliary=auxiliary, progress_every=progress_every,
        dht_local=Endpoint.parse(dht_local) if dht_local else None,
        averager_local=Endpoint.parse(averager_local) if averager_local else None,
        initial_peers=[] if new_swarm else parse_peer_list(initial_peers) if initial_peers is not None else None,
        averaging=_json_object(averaging, "--averaging"), min_peers=min_peers,
        min_peers_timeout=min_peers_timeout, max_epochs=max_epochs, max_seconds=max_seconds,
        device=device, gpus=_gpus(gpus), threads=threads, checkpoint_dir=checkpoint_dir, checkpoint_period=checkpoint_period,
        summary_path=summary_path, evaluate_every=evaluate_every,
    )
    if settings.dht_local is None:  # embedded services: they join a swarm or start one, said explicitly
        require_join_or_new_swarm(initial_peers, new_swarm, " (or this participant's services: --dht-local and "
                                  "--averager-local)")
    wire = WireSettings(listen_host=host, tls=tls, run_authority=run_authority, access_token=access_token,
                        **relay_fields(relay, relay_port, relay_limits))
    asyncio.run(_serve(wire, service_settings(identity, admin_host, admin_port, tracing, otlp_endpoint,
                                              reachability_settings(reachability, relays, reachability_period)), settings))


async def _serve(wire: WireSettings, shared: ServiceSettings, settings: Any) -> None:
    from apiary.optim.local_group import LocalGroupError
    from apiary.services.trainer import TrainerService
    from apiary.tasks import TaskError

    try:
        service = TrainerService(wire, shared, settings)
    except TaskError as e:
        raise typer.BadParameter(str(e), param_hint="'--task' / '--task-options'") from None
    except ValueError as e:  # a device that is not there
        raise typer.BadParameter(str(e), param_hint="'--device' / '--gpus'") from None
    await service.start()
    console.print(f"trainer of run {settings.run_id!r}: admin {service.host.admin.url}", highlight=False)
    try:
        await service.run()
    except LocalGroupError as e:  # a local rank failed: the others are stopped; one line, as main() writes errors
        print(f"apiary: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    console.print(json.dumps(service.summary), highlight=False)

"""Options that are both a flag and an `APIARY_*` environment variable with the same meaning,
and the options every service shares (admin endpoint, identity, tracing, security, reachability)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional


import typer

from apiary.services.host import ServiceSettings
from apiary.services.reachability import ReachabilityMode, ReachabilitySettings
from apiary.telemetry import TracingSettings
from apiary.wire import WireSettings

ENV_PREFIX = "APIARY_"


class CommandError(Exception):
    """A command could not do its work for a reason the user can act on; `apiary` prints it as one line."""


def env_name(flag: str) -> str:
    """The environment variable of a flag: `--initial-peers` -> `APIARY_INITIAL_PEERS`, `--tls/--plaintext` -> `APIARY_TLS`."""
    return ENV_PREFIX + flag.split("/")[0].lstrip("-").replace("-", "_").upper()


def option(flag: str, help: str, **kwargs: Any) -> Any:
    """A typer option named `flag` that also reads `APIARY_<FLAG>` from the environment."""
    return typer.Option(flag, help=help, envvar=env_name(flag), show_envvar=True, **kwargs)


TlsOption = Annotated[bool, option("--tls/--plaintext", "TLS on the public ports, each server proving its peer id "
                                    "(dial peer_id@host:port); --plaintext only for tests and fully trusted networks")]
RunAuthorityOption = Annotated[Optional[str], option("--run-authority", "private run: the peer id of the run's authority (none: an open run)")]
AccessTokenOption = Annotated[Optional[str], option("--access-token", "private run: this peer's access token, or the file holding it (`apiary token issue`)")]

AdminHostOption = Annotated[str, option("--admin-host", "interface of the admin HTTP endpoint")]
AdminPortOption = Annotated[int, option("--admin-port", "admin HTTP port (0: any free port)")]
IdentityOption = Annotated[Optional[Path], option("--identity", "identity file (created if absent)")]
TracingOption = Annotated[str, option("--tracing", "span exporter: none, console or otlp")]
OtlpEndpointOption = Annotated[Optional[str], option("--otlp-endpoint", "OTLP/gRPC collector, with --tracing otlp")]

# What strangers may make a service hold; each service's default fits what it serves.
MaxTensorBytesOption = Annotated[int, option("--max-tensor-bytes", "largest tensor a peer may send, bytes", min=0)]
MaxBytesInFlightOption = Annotated[int, option("--max-bytes-in-flight", "bytes of tensors and frames being received from peers, all together", min=0)]
MaxBytesInFlightPerPeerOption = Annotated[Optional[int], option("--max-bytes-in-flight-per-peer", "share of --max-bytes-in-flight one peer (host) may hold (default: a quarter, at least --max-tensor-bytes)", min=0)]
StreamStallTimeoutOption = Annotated[float, option("--stream-stall-timeout", "seconds a peer's stream may send nothing before it is cut off and its bytes given back", min=0.01)]

# Reachability (apiary.services.reachability) and relaying for others (apiary.wire.relay).
ReachabilityOption = Annotated[ReachabilityMode, option("--reachability", "auto: check whether peers can dial this "
                               "service, behind NAT use relays (else client mode); public: no check; relayed: always "
                               "through relays; client: dial out only", case_sensitive=False)]
RelaysOption = Annotated[int, option("--relays", "relay reservations kept when behind NAT", min=1, max=16)]
ReachabilityPeriodOption = Annotated[float, option("--reachability-period", "seconds between reachability checks", min=1)]
RelayOption = Annotated[bool, option("--relay/--no-relay", "offer relaying to peers behind NAT (on --relay-port), "
                                     "listed in the DHT")]
RelayPortOption = Annotated[int, option("--relay-port", "relay port to bind, with --relay (0: any free port)", min=0, max=65535)]


def service_settings(identity: Path | None, admin_host: str, admin_port: int, tracing: str,
                     otlp_endpoint: str | None, reachability: ReachabilitySettings | None = None) -> ServiceSettings:
    """The settings every service has, from the shared options above."""
    return ServiceSettings(identity=identity, admin_host=admin_host, admin_port=admin_port,
                           tracing=TracingSettings(exporter=tracing, otlp_endpoint=otlp_endpoint),
                           reachability=reachability or ReachabilitySettings())


def reachability_settings(reachability: ReachabilityMode, relays: int, period: float) -> ReachabilitySettings:
    """The settings of the reachability options above."""
    return ReachabilitySettings(reachability=reachability, relays=relays, reachability_period=period)


def relay_fields(relay: bool, relay_port: int, relay_limits: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `WireSettings` fields of the relay options above and of the limits `with_relay_limits` adds."""
    return {"relay": relay, "relay_port": relay_port, **(relay_limits or {})}


# What a relay (--relay) lets others make it hold: a flag each, `WireSettings`' field with dashes.
RELAY_LIMITS = ("relay_max_reservations", "relay_max_circuits", "relay_max_circuits_per_peer",
                "relay_max_handshakes_per_peer", "relay_circuit_bytes_per_second", "relay_bytes_per_second",
                "relay_idle_timeout", "relay_reservation_timeout")


def _above(bound: float) -> Callable[[float], float]:
    def check(value: float) -> float:
        if not value > bound:
            raise typer.BadParameter(f"{value} is not above {bound}")
        return value
    return check


def _field_option(name: str) -> Any:
    """The annotation of a flag for `WireSettings` field `name`: its type, description and bounds."""
    field = WireSettings.model_fields[name]
    bounds: dict[str, Any] = {}
    for bound in field.metadata:  # pydantic's Ge(ge=...) and Gt(gt=...)
        if getattr(bound, "ge", None) is not None:
            bounds["min"] = bound.ge
        if getattr(bound, "gt", None) is not None:
            bounds["callback"] = _above(bound.gt)
    flag = "--" + name.replace("_", "-")
    return Annotated[field.annotation, option(flag, f"{field.description}, with --relay", **bounds)]


def with_relay_limits(command: Callable[..., None]) -> Callable[..., None]:
    """`command` (which takes `relay_limits`) with a flag for each of RELAY_LIMITS in its place;
    it gets the values of those flags as `relay_limits`, the `WireSettings` fields for `relay_fields`."""
    parameters = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "relay_limits"]
    limits = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=WireSettings.model_fields[name].default,
                                annotation=_field_option(name)) for name in RELAY_LIMITS]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        relay_limits = {name: kwargs.pop(name) for name in RELAY_LIMITS}
        command(**kwargs, relay_limits=relay_limits)

    wrapper.__signature__ = inspect.Signature([*parameters, *limits])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in [*parameters, *limits]}
    return wrapper


def transfer_limits(max_tensor_bytes: int, max_bytes_in_flight: int, max_bytes_in_flight_per_peer: int | None,
                    stream_stall_timeout: float) -> dict[str, Any]:
    """The `WireSettings` fields of the transfer-limit options above."""
    return {"max_tensor_bytes": max_tensor_bytes, "max_bytes_in_flight": max_bytes_in_flight,
            "max_bytes_in_flight_per_peer": max_bytes_in_flight_per_peer, "stream_stall_timeout": stream_stall_timeout}


NewSwarmOption = Annotated[bool, option("--new-swarm", "start a new swarm (as its first peer) instead of joining "
                                         "one through --initial-peers")]


def require_join_or_new_swarm(initial_peers: str | None, new_swarm: bool, alternative: str = "") -> None:
    """A service with a DHT node of its own joins a swarm (`--initial-peers`) or starts one
    (`--new-swarm`), said explicitly: an empty `--initial-peers` alone starts nothing."""
    hint = "'--initial-peers' / '--new-swarm'"
    joining = bool(initial_peers and initial_peers.strip())
    if joining and new_swarm:
        raise typer.BadParameter("give one: --initial-peers joins a swarm, --new-swarm starts one", param_hint=hint)
    if not joining and not new_swarm:
        raise typer.BadParameter("give --initial-peers peer_id@host:port,... to join a swarm, or --new-swarm to "
                                 f"start a new one{alternative}", param_hint=hint)


def require_one_way_to_the_dht(dht_local: str | None, initial_peers: str) -> None:
    """A service reaches the DHT through its participant's dht service or an embedded node: one of them."""
    if (dht_local is None) == (not initial_peers.strip()):
        raise typer.BadParameter(
            "give exactly one: --dht-local (the dht service's local API) or --initial-peers (an embedded DHT node)",
            param_hint="'--dht-local' / '--initial-peers'",
        )

"""No drift between the chart and the CLI's parsing: every container of every example rendering,
started as its pod would start it (Kubernetes' field and $(VAR) values filled in, its script run),
hands `apiary <service>` an environment that the real typer app parses (types, ranges, choices) and
whose peer addresses the code's own parser reads; and the schema's bounds are the CLI's."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from apiary.cli.options import require_join_or_new_swarm
from apiary.wire import WireSettings
from apiary.wire.address import parse_peer_list
from apiary.wire.identity import public_key_from_peer_id
from deploy.cli import commands
from deploy.helm import CHART, VALUES_FILES, apiary_command, pod_specs, render, start_as_pod, values_of

FIELDS = {"status.podIP": "10.1.2.3", "status.hostIP": "10.0.0.4", "spec.nodeName": "node-a",
          "metadata.namespace": "swarm"}
SECRET = "s3cretpassw0rd"


def as_started(workload: dict, spec: dict, ordinal: int, directory: Path) -> dict[str, str]:
    """The APIARY_* environment `apiary` gets in pod <workload>-<ordinal>: valueFrom filled in as
    Kubernetes would, $(VAR) references expanded, then the container's script run."""
    pod = f"{workload['metadata']['name']}-{ordinal}"
    env: dict[str, str] = {}
    for entry in spec.get("env", []):
        if "value" in entry:
            env[entry["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), entry["value"])
        elif "fieldRef" in entry["valueFrom"]:
            env[entry["name"]] = pod if entry["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" else \
                FIELDS[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[entry["name"]] = SECRET
    literal = {**spec, "env": [{"name": k, "value": v} for k, v in env.items()]}
    if spec.get("command", [])[:2] == ["/bin/sh", "-c"]:
        return start_as_pod(literal, pod, directory)["env"]
    return {k: v for k, v in env.items() if k.startswith("APIARY_")}


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update({k: v for k, v in saved.items() if not k.startswith("APIARY_")} | env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def parse(service: str, env: dict[str, str]) -> dict:
    """The options `apiary <service>` reads from `env`, parsed by the real typer app (not run)."""
    with environment(env):
        with commands()[service].make_context(service, []) as context:
            return dict(context.params)


def parsed_containers(values: dict | None, directory: Path) -> Iterator[tuple[str, dict]]:
    for workload, pod in pod_specs(render(values)):
        for spec in pod["containers"]:
            command = apiary_command(spec)
            if command is None:
                continue
            for ordinal in (0, 1):
                env = as_started(workload, spec, ordinal, directory / f"{spec['name']}-{ordinal}")
                yield command[1], parse(command[1], env)


@pytest.mark.parametrize("values", [None, *VALUES_FILES])
def test_every_container_starts_with_settings_the_cli_parses(values: str | None, tmp_path: Path) -> None:
    seen = set()
    for service, params in parsed_containers(values_of(values), tmp_path):
        seen.add(service)
        if "initial_peers" in params:
            parse_peer_list(params["initial_peers"] or "")  # as the command reads them
        if "new_swarm" in params and not params.get("dht_local"):  # its own DHT node joins or starts a swarm
            require_join_or_new_swarm(params["initial_peers"], params["new_swarm"])
        if params.get("run_authority"):
            public_key_from_peer_id(params["run_authority"])
        if service == "dht" and params.get("redis_url"):
            assert re.fullmatch(r"rediss?://(:\w+@)?[\w.-]+:\d+/\d+", params["redis_url"]), params["redis_url"]
    assert {"dht", "expert-server", "trainer", "averager"} <= seen


def test_the_check_refuses_what_the_cli_refuses(tmp_path: Path) -> None:
    """The same path finds a setting the CLI would stop at: a reservation count past its range."""
    values = {"exposure": {"mode": "relayed", "relayed": {"reservations": 16}}}
    assert all(p.get("relays") == 16 for s, p in parsed_containers(values, tmp_path) if s != "trainer")
    for name, value in (("relays", "17"), ("reachability", "sometimes"), ("port", "http")):
        with pytest.raises(Exception) as refused:  # typer's (vendored) click.BadParameter
            parse("dht", {f"APIARY_{name.upper()}": value})
        assert type(refused.value).__name__ == "BadParameter" and refused.value.param.name == name


def test_the_schemas_bounds_and_choices_are_the_clis() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    options = {p.name: p for p in commands()["dht"].params}
    relays = schema["properties"]["exposure"]["properties"]["relayed"]["properties"]["reservations"]
    assert (relays["minimum"], relays["maximum"]) == (options["relays"].min, options["relays"].max)
    reachability = schema["properties"]["dht"]["properties"]["reachability"]["enum"]
    assert sorted(reachability) == sorted(m.value for m in options["reachability"].type_descriptor.annotation)
    for mode in schema["properties"]["trainer"]["properties"]["averager"]["properties"]["mode"]["enum"]:
        assert parse("averager", {"APIARY_MODE": mode, "APIARY_RUN_ID": "r"})["mode"] is not None


RELAY_LIMITS = {"maxReservations": 3, "maxCircuits": 2_000_000, "maxCircuitsPerPeer": 5, "maxHandshakesPerPeer": 6,
                "circuitBytesPerSecond": 1.5e6, "bytesPerSecond": 8e6, "idleTimeout": 60, "reservationTimeout": 0.5}


def relay_setting(value_name: str) -> str:
    """The `WireSettings` field (and `apiary dht` parameter) of a `dht.relayLimits` value: maxCircuits -> relay_max_circuits."""
    return "relay_" + re.sub(r"([A-Z])", r"_\1", value_name).lower()


def test_the_relays_limits_reach_the_dht_as_its_settings_within_the_clis_bounds(tmp_path: Path) -> None:
    values = {"dht": {"relay": True, "relayLimits": RELAY_LIMITS}}
    dhts = [params for service, params in parsed_containers(values, tmp_path) if service == "dht"]
    assert dhts and all(params["relay"] for params in dhts)
    for params in dhts:
        assert {name: params[relay_setting(name)] for name in RELAY_LIMITS} == RELAY_LIMITS
    unset = [params for service, params in parsed_containers({"dht": {"relay": True}}, tmp_path) if service == "dht"]
    assert all(params[relay_setting(name)] == WireSettings.model_fields[relay_setting(name)].default
               for params in unset for name in RELAY_LIMITS)
    schema = json.loads((CHART / "values.schema.json").read_text())
    bounds = schema["properties"]["dht"]["properties"]["relayLimits"]["properties"]
    assert set(bounds) == set(RELAY_LIMITS)
    for name, bound in bounds.items():
        field = WireSettings.model_fields[relay_setting(name)]
        ge = [m.ge for m in field.metadata if hasattr(m, "ge")]
        gt = [m.gt for m in field.metadata if hasattr(m, "gt")]
        assert ([bound["minimum"]] if "minimum" in bound else []) == ge, name
        assert ([bound["exclusiveMinimum"]] if "exclusiveMinimum" in bound else []) == gt, name

"""The Compose bundle (compose.yaml, compose.gpu.yaml, .env.example), offline: the Compose
specification's JSON schema, what one participant's bundle must hold, and `docker-compose
config` where Compose is installed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from deploy.engine import EngineUnavailable, compose_cli
from deploy.files import (
    COMPOSE_FILE, COMPOSE_GPU_FILE, COMPOSE_SCHEMA, ENV_EXAMPLE, REPO, SERVICES, Dockerfile, MissingVariable,
    dockerfile_path, load_compose, merge_compose, read_env_file, variables_used,
)

FILES = (COMPOSE_FILE, COMPOSE_GPU_FILE)
PUBLIC_PORTS = ("APIARY_PORT", "APIARY_BULK_PORT")


def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def bundle(*files: Path) -> dict[str, Any]:
    """The files merged and filled in from .env.example, as Compose runs them."""
    merged: dict[str, Any] = {}
    for doc in load_compose(*files, env=read_env_file(ENV_EXAMPLE)):
        merged = merge_compose(merged, doc)
    return merged


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Target -> source of a service's volumes, in short (`src:dst[:mode]`) or long syntax."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found[volume["target"]] = volume["source"]
        else:
            source, target = volume.split(":")[:2]
            found[target] = source
    return found


def errors(doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator().iter_errors(doc)]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(path: Path) -> None:
    assert errors(yaml.safe_load(path.read_text())) == []
    assert errors(load_compose(path, env=read_env_file(ENV_EXAMPLE))[0]) == []


def test_the_gpu_overlay_on_the_base_file_follows_the_specification() -> None:
    assert errors(bundle(*FILES)) == []


def test_the_schema_refuses_what_compose_would_refuse() -> None:
    doc = bundle(COMPOSE_FILE)
    doc["services"]["dht"]["healthcheck"]["intervall"] = "5s"
    doc["services"]["trainer"]["depends_on"]["averager"]["condition"] = "service_ready"
    problems = errors(doc)
    assert any("intervall" in p for p in problems) and any("service_ready" in p for p in problems)


def test_every_setting_comes_from_the_env_file() -> None:
    used = set().union(*(variables_used(path.read_text()) for path in FILES))
    documented = set(read_env_file(ENV_EXAMPLE))
    assert used == documented, f"used only: {sorted(used - documented)}; documented only: {sorted(documented - used)}"
    for setting in ("APIARY_RUN_ID", "APIARY_INITIAL_PEERS", "APIARY_ANNOUNCE_HOST", "APIARY_DHT_PORT", "APIARY_TASK"):
        assert setting in documented


@pytest.mark.parametrize("missing", ["APIARY_RUN_ID", "APIARY_TASK", "APIARY_EXPERTS"])
def test_a_missing_required_setting_is_named(missing: str) -> None:
    env = read_env_file(ENV_EXAMPLE)
    env[missing] = ""
    with pytest.raises(MissingVariable, match=missing):
        load_compose(COMPOSE_FILE, env=env)


def test_one_participant_runs_the_four_services_and_redis() -> None:
    services = bundle(COMPOSE_FILE)["services"]
    assert set(services) == {*SERVICES, "redis", "prometheus", "grafana"}
    for name in SERVICES:
        assert services[name]["build"] == {"context": ".", "dockerfile": f"services/{name}/Dockerfile"}
        assert services[name]["image"].endswith(f"/{name}:latest")
    assert services["dht"]["environment"]["APIARY_REDIS_URL"] == "redis://redis:6379/0"
    assert "redis-data:/data" in services["redis"]["volumes"]


def test_services_start_once_what_they_need_is_healthy() -> None:
    services = bundle(COMPOSE_FILE)["services"]
    needs = {"dht": {"redis"}, "averager": {"dht"}, "expert-server": {"dht"}, "trainer": {"averager", "expert-server"}}
    for name, dependencies in needs.items():
        assert services[name]["depends_on"] == {d: {"condition": "service_healthy"} for d in dependencies}
        for dependency in dependencies:
            assert services[dependency]["healthcheck"]["test"][0] == "CMD"


def test_the_trainer_and_its_averager_share_memory() -> None:
    doc = bundle(COMPOSE_FILE)
    mounting = {name for name, service in doc["services"].items() if mounts(service).get("/dev/shm") == "shm"}
    assert mounting == {"trainer", "averager"}
    for name in mounting:  # the tmpfs as mounted, writable by the unprivileged user of the images
        [shm] = [v for v in doc["services"][name]["volumes"] if isinstance(v, dict) and v["target"] == "/dev/shm"]
        assert shm["volume"] == {"nocopy": True}
    assert doc["volumes"]["shm"]["driver_opts"] == {"type": "tmpfs", "device": "tmpfs", "o": "size=2g,mode=1777"}


def test_identity_checkpoints_and_redis_data_live_on_named_volumes() -> None:
    doc = bundle(COMPOSE_FILE)
    for name in SERVICES:
        mounted = mounts(doc["services"][name])
        image_env = Dockerfile.read(dockerfile_path(name)).env
        for setting in ("APIARY_IDENTITY", "APIARY_CHECKPOINT_DIR", "APIARY_STATE_PATH"):
            if setting in image_env:  # what the service keeps lies on a named volume
                folder = next((m for m in mounted if image_env[setting].startswith(m + "/")), None)
                assert folder is not None and mounted[folder] in doc["volumes"], f"{name}: {setting}"


def test_public_ports_are_published_as_announced_and_admin_ports_only_locally() -> None:
    services = bundle(COMPOSE_FILE)["services"]
    for name in SERVICES:
        env = services[name]["environment"]
        ports = services[name]["ports"]
        for setting in PUBLIC_PORTS:
            if setting in env:
                assert f"{env[setting]}:{env[setting]}" in ports, f"{name}: {setting}"
        admin = Dockerfile.read(dockerfile_path(name)).env["APIARY_ADMIN_PORT"]
        local_only = [p for p in ports if p.endswith(f":{admin}")]
        assert len(local_only) == 1 and local_only[0].startswith("127.0.0.1:"), f"{name}: {ports}"
    assert all(p.startswith("127.0.0.1:") for s in ("prometheus", "grafana") for p in services[s]["ports"])


def test_the_gpu_overlay_reserves_nvidia_gpus_for_trainer_and_expert_server_only() -> None:
    base, overlaid = bundle(COMPOSE_FILE)["services"], bundle(*FILES)["services"]
    assert not [name for name, service in base.items() if "deploy" in service]
    reserving = {name: s["deploy"]["resources"]["reservations"]["devices"] for name, s in overlaid.items() if "deploy" in s}
    assert set(reserving) == {"trainer", "expert-server"}
    for devices in reserving.values():
        assert devices == [{"driver": "nvidia", "count": "1", "capabilities": ["gpu"]}]  # from .env, as text
    assert overlaid["expert-server"]["environment"]["APIARY_DEVICE"] == "cuda"
    assert overlaid["expert-server"]["environment"]["APIARY_EXPERTS"] == base["expert-server"]["environment"]["APIARY_EXPERTS"]


def test_the_monitoring_profile_scrapes_every_service_and_provisions_grafana() -> None:
    services = bundle(COMPOSE_FILE)["services"]
    profiled = {name for name, service in services.items() if service.get("profiles")}
    assert profiled == {"prometheus", "grafana"} and services["grafana"]["profiles"] == ["monitoring"]

    prometheus, grafana = mounts(services["prometheus"]), mounts(services["grafana"])
    config = yaml.safe_load((REPO / prometheus["/etc/prometheus/prometheus.yml"]).read_text())
    targets = {t for job in config["scrape_configs"] for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:{Dockerfile.read(dockerfile_path(name)).env['APIARY_ADMIN_PORT']}" for name in SERVICES}

    provisioning = REPO / grafana["/etc/grafana/provisioning"]
    providers = yaml.safe_load((provisioning / "dashboards" / "apiary.yaml").read_text())["providers"]
    [dashboards] = [p["options"]["path"] for p in providers]
    assert (REPO / grafana[dashboards]).resolve() == (REPO / "deploy/grafana/dashboards").resolve()
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    prometheus_port = services["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert [d["url"] for d in datasources["datasources"]] == [f"http://prometheus:{prometheus_port}"]


@pytest.mark.parametrize("files", [(COMPOSE_FILE,), FILES], ids=["cpu", "gpu"])
def test_docker_compose_accepts_the_bundle(files: tuple[Path, ...], tmp_path: Path) -> None:
    try:
        compose = compose_cli()  # installed here as root (CI) where missing
    except EngineUnavailable as e:
        pytest.skip(f"no docker-compose to validate with: {e}")
    env_file = tmp_path / "participant.env"
    env_file.write_text(ENV_EXAMPLE.read_text())
    command = [compose, "--env-file", str(env_file), "--profile", "monitoring"]
    for path in files:
        command += ["--file", str(path)]
    result = subprocess.run([*command, "config"], capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert set(services) == {*SERVICES, "redis", "prometheus", "grafana"}
    assert services["averager"]["environment"]["APIARY_RUN_ID"] == "my-run"

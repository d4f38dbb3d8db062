"""The Compose bundle (compose.yaml, compose.gpu.yaml, .env.example), offline: the Compose
specification's JSON schema, what one participant's bundle must hold (TLS and, in a private
run, each service's own access token among it), `docker-compose config` where Compose is
installed, and the private-run steps the bundle documents, run with the real CLI."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from apiary.cli.main import app
from apiary.cli.options import RELAY_LIMITS
from apiary.moe.names import expand_expert_names
from apiary.tasks import task_expert_grid
from apiary.wire import Identity, WireSettings
from apiary.wire.auth import CallCredentials, CredentialsError
from deploy.cli import commands, env_vars
from deploy.engine import EngineUnavailable, compose_cli
from deploy.files import (
    COMPOSE_FILE, COMPOSE_GPU_FILE, COMPOSE_SCHEMA, ENV_EXAMPLE, IDENTITY_ENTRIES, REPO, SERVICES, MissingVariable,
    image_definition, load_compose, make_identities, merge_compose, read_env_file, variables_used,
)

FILES = (COMPOSE_FILE, COMPOSE_GPU_FILE)
PUBLIC_PORTS = ("APIARY_PORT", "APIARY_BULK_PORT", "APIARY_RELAY_PORT")
DOCS = REPO / "docs" / "deploy.md"
# the .env entry of each service's access token file (each service has its own identity)
TOKEN_ENTRIES = {name: f"APIARY_{name.upper().replace('-', '_')}_TOKEN_FILE" for name in SERVICES}
SECRET_TOKEN = "/run/secrets/access-token"
SECRET_IDENTITY = "/run/secrets/identity"
VARIANT_SERVICES = ("expert-server", "trainer")  # images in a cpu and a cuda variant
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def bundle(*files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The files merged and filled in from `env` (default: .env.example), as Compose runs them."""
    merged: dict[str, Any] = {}
    for doc in load_compose(*files, env=read_env_file(ENV_EXAMPLE) if env is None else env):
        merged = merge_compose(merged, doc)
    return merged


def private_run_env_file(authority: str) -> str:
    """.env.example as an operator fills it in for a private run: the authority, and each
    service's own token file (./secrets/<service>.token)."""
    text = ENV_EXAMPLE.read_text()
    text = re.sub(r"^APIARY_RUN_AUTHORITY=$", f"APIARY_RUN_AUTHORITY={authority}", text, count=1, flags=re.MULTILINE)
    for name, entry in TOKEN_ENTRIES.items():
        text = re.sub(rf"^{entry}=$", f"{entry}=./secrets/{name}.token", text, count=1, flags=re.MULTILINE)
    return text


def identity_file(doc: dict[str, Any], service: str) -> str:
    """The file a service's /run/secrets/identity comes from."""
    [secret] = [s for s in doc["services"][service]["secrets"] if s["target"] == SECRET_IDENTITY.rsplit("/", 1)[1]]
    return doc["secrets"][secret["source"]]["file"]


def token_file(doc: dict[str, Any], service: str) -> str:
    """The file a service's /run/secrets/access-token comes from."""
    [secret] = [s for s in doc["services"][service]["secrets"] if s["target"] == SECRET_TOKEN.rsplit("/", 1)[1]]
    return doc["secrets"][secret["source"]]["file"]


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


def docker_compose_config(files: tuple[Path, ...], env_text: str, tmp_path: Path) -> dict[str, Any]:
    """`docker-compose config` of the files with this .env, as YAML (skips without Compose)."""
    try:
        compose = compose_cli()  # installed here as root (CI) where missing
    except EngineUnavailable as e:
        pytest.skip(f"no docker-compose to validate with: {e}")
    env_file = tmp_path / "participant.env"
    env_file.write_text(env_text)
    command = [compose, "--env-file", str(env_file), "--profile", "monitoring"]
    for path in files:
        command += ["--file", str(path)]
    result = subprocess.run([*command, "config"], capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def defaults_only(node: Any) -> Any:
    """A Compose file with each value that is one `${VAR:-default}` replaced by its default (a
    variable stands where the schema wants a keyword; Compose checks the filled-in file)."""
    if isinstance(node, dict):
        return {key: defaults_only(value) for key, value in node.items()}
    if isinstance(node, list):
        return [defaults_only(value) for value in node]
    match = re.fullmatch(r"\$\{[A-Z_]+:-([^}]*)\}", node) if isinstance(node, str) else None
    return match.group(1) if match else node


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(path: Path) -> None:
    assert errors(defaults_only(yaml.safe_load(path.read_text()))) == []
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


@pytest.mark.parametrize("missing", ["APIARY_RUN_ID", "APIARY_TASK"])
def test_a_missing_required_setting_is_named(missing: str) -> None:
    env = read_env_file(ENV_EXAMPLE)
    env[missing] = ""
    with pytest.raises(MissingVariable, match=missing):
        load_compose(COMPOSE_FILE, env=env)


def test_one_participant_runs_the_four_services_and_redis() -> None:
    services = bundle(COMPOSE_FILE)["services"]
    assert set(services) == {*SERVICES, "redis", "prometheus", "grafana", "monitor"}
    for name in SERVICES:
        build = services[name]["build"]
        assert (build["context"], build["dockerfile"], build["target"]) == (".", "services/Dockerfile", name)
        variant = "-cpu" if name in VARIANT_SERVICES else ""
        assert services[name]["image"] == f"apiary/{name}:{VERSION}{variant}"  # the package's version, no latest
        assert services[name]["pull_policy"] == "build"  # never pulled from a registry namespace we do not own
        assert build.get("args", {}) == ({"DEVICE": "cpu"} if variant else {})
    assert read_env_file(ENV_EXAMPLE)["APIARY_IMAGE_TAG"] == VERSION and read_env_file(ENV_EXAMPLE)["APIARY_DEVICE"] == "cpu"
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


def test_checkpoints_and_redis_data_live_on_named_volumes() -> None:
    doc = bundle(COMPOSE_FILE)
    for name in SERVICES:
        mounted = mounts(doc["services"][name])
        image_env = image_definition(name).env
        for setting in ("APIARY_CHECKPOINT_DIR", "APIARY_STATE_PATH"):
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
        admin = image_definition(name).env["APIARY_ADMIN_PORT"]
        local_only = [p for p in ports if p.endswith(f":{admin}")]
        assert len(local_only) == 1 and local_only[0].startswith("127.0.0.1:"), f"{name}: {ports}"
    assert all(p.startswith("127.0.0.1:") for s in ("prometheus", "grafana", "monitor") for p in services[s]["ports"])


def test_the_gpu_overlay_reserves_nvidia_gpus_for_trainer_and_expert_server_only() -> None:
    base, overlaid = bundle(COMPOSE_FILE)["services"], bundle(*FILES)["services"]
    assert not [name for name, service in base.items() if "deploy" in service]
    reserving = {name: s["deploy"]["resources"]["reservations"]["devices"] for name, s in overlaid.items() if "deploy" in s}
    assert set(reserving) == {"trainer", "expert-server"}
    ids = {}
    for name, devices in reserving.items():
        [device] = devices
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and "count" not in device
        ids[name] = device["device_ids"]
    assert ids == {"trainer": ["0"], "expert-server": ["1"]}  # by default never the same GPU
    assert overlaid["trainer"]["environment"]["APIARY_GPUS"] == "all"  # a rank on every GPU it is given
    for name in VARIANT_SERVICES:  # the CUDA variant of the same image, on the same base
        assert overlaid[name]["environment"]["APIARY_DEVICE"] == "cuda"
        assert overlaid[name]["image"] == f"apiary/{name}:{VERSION}-cuda"
        assert overlaid[name]["build"]["args"] == {"DEVICE": "cuda"}
    assert overlaid["expert-server"]["environment"]["APIARY_EXPERTS"] == base["expert-server"]["environment"]["APIARY_EXPERTS"]


def test_gpus_are_shared_only_when_asked() -> None:
    env = {**read_env_file(ENV_EXAMPLE), "APIARY_TRAINER_GPUS": "0,1", "APIARY_EXPERT_SERVER_GPUS": "2"}
    services = bundle(*FILES, env=env)["services"]
    assert services["trainer"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0,1"]
    assert services["expert-server"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["2"]
    shared = bundle(*FILES, env={**env, "APIARY_TRAINER_GPUS": "0", "APIARY_EXPERT_SERVER_GPUS": "0"})["services"]
    assert {name: shared[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
            for name in VARIANT_SERVICES} == {"trainer": ["0"], "expert-server": ["0"]}


@pytest.mark.parametrize("gpus", [("0", "1"), ("0,1", "2"), ("0", "0")], ids=["defaults", "two-for-the-trainer", "shared"])
def test_docker_compose_renders_the_gpus_asked_for(gpus: tuple[str, str], tmp_path: Path) -> None:
    text = ENV_EXAMPLE.read_text().replace("APIARY_TRAINER_GPUS=0", f"APIARY_TRAINER_GPUS={gpus[0]}").replace(
        "APIARY_EXPERT_SERVER_GPUS=1", f"APIARY_EXPERT_SERVER_GPUS={gpus[1]}")
    services = docker_compose_config(FILES, text, tmp_path)["services"]
    rendered = {name: services[name]["deploy"]["resources"]["reservations"]["devices"] for name in VARIANT_SERVICES}
    for name, asked in zip(VARIANT_SERVICES[::-1], gpus):
        assert rendered[name] == [{"driver": "nvidia", "device_ids": [asked], "capabilities": ["gpu"]}], rendered
        assert services[name]["image"] == f"apiary/{name}:{VERSION}-cuda"


def test_the_trainer_takes_tasks_from_the_task_path_on_its_pythonpath() -> None:
    trainer = bundle(COMPOSE_FILE)["services"]["trainer"]
    folder = image_definition("trainer").env["PYTHONPATH"]
    assert mounts(trainer)[folder] == read_env_file(ENV_EXAMPLE)["APIARY_TASK_PATH"] == "./deploy/tasks"
    assert f"./deploy/tasks:{folder}:ro" in trainer["volumes"]  # read-only
    assert (REPO / "deploy" / "tasks").is_dir()


def test_the_default_task_uses_this_participants_expert_server_through_its_dht() -> None:
    """moe_lm, the flagship: the trainer finds the experts through APIARY_DHT_LOCAL; the expert
    server hosts a share of moe_lm's grid (its patterns, kind and size from the task)."""
    services = bundle(COMPOSE_FILE)["services"]
    trainer, server = services["trainer"]["environment"], services["expert-server"]["environment"]
    assert trainer["APIARY_TASK"] == "moe_lm" and trainer["APIARY_DHT_LOCAL"] == server["APIARY_DHT_LOCAL"]
    assert server["APIARY_TASK"] == "moe_lm" and server["APIARY_NUM_EXPERTS"] == "8"
    assert server["APIARY_EXPERTS"] == server["APIARY_KIND"] == server["APIARY_HIDDEN_SIZE"] == ""  # the grid's
    grid = task_expert_grid(server["APIARY_TASK"])
    assert len(expand_expert_names(grid.patterns)) % int(server["APIARY_NUM_EXPERTS"]) == 0  # shares split it


def test_the_monitoring_profile_scrapes_every_service_and_provisions_grafana() -> None:
    services = bundle(COMPOSE_FILE)["services"]
    profiled = {name for name, service in services.items() if service.get("profiles")}
    assert profiled == {"prometheus", "grafana", "monitor"}
    assert all(services[name]["profiles"] == ["monitoring"] for name in profiled)

    prometheus, grafana = mounts(services["prometheus"]), mounts(services["grafana"])
    config = yaml.safe_load((REPO / prometheus["/etc/prometheus/prometheus.yml"]).read_text())
    targets = {t for job in config["scrape_configs"] for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:{image_definition(name).env['APIARY_ADMIN_PORT']}" for name in SERVICES}
    [rules] = config["rule_files"]  # relative to the configuration file's folder
    rules_folder, pattern = rules.split("/")
    assert sorted((REPO / prometheus[f"/etc/prometheus/{rules_folder}"]).glob(pattern)) == sorted(
        (REPO / "deploy/prometheus/rules").glob("*.yml"))

    provisioning = REPO / grafana["/etc/grafana/provisioning"]
    providers = yaml.safe_load((provisioning / "dashboards" / "apiary.yaml").read_text())["providers"]
    [dashboards] = [p["options"]["path"] for p in providers]
    assert (REPO / grafana[dashboards]).resolve() == (REPO / "deploy/grafana/dashboards").resolve()
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    prometheus_port = services["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert [d["url"] for d in datasources["datasources"]] == [f"http://prometheus:{prometheus_port}"]


def test_the_monitoring_profile_serves_the_swarm_monitor_from_the_dht_image() -> None:
    services = bundle(COMPOSE_FILE)["services"]
    monitor, dht = services["monitor"], services["dht"]
    assert monitor["image"] == dht["image"] and "build" not in monitor  # the dht's image: no torch
    assert monitor["entrypoint"] == ["apiary", "monitor"]
    assert set(monitor["environment"]) <= env_vars("monitor")
    assert monitor["environment"]["APIARY_DHT_LOCAL"] == f"dht:{image_definition('dht').env['APIARY_LOCAL_PORT']}"
    admin = image_definition("dht").env["APIARY_ADMIN_PORT"]  # the monitor's page port, as the image sets it
    assert "APIARY_ADMIN_PORT" in env_vars("monitor") and monitor["ports"] == [f"127.0.0.1:8900:{admin}"]
    assert monitor["healthcheck"]["test"][-1] == "/readyz" and monitor["depends_on"] == {"dht": {"condition": "service_healthy"}}


@pytest.mark.parametrize("policy", ["if_not_present", "always"])
def test_published_images_are_pulled_with_no_override_file(policy: str, tmp_path: Path) -> None:
    """Two lines of .env switch the bundle to a registry's images, valid for Compose v2 (the
    specification's schema) and 1.29 (its own `config`)."""
    env_text = re.sub(r"^APIARY_IMAGE_PREFIX=.*$", "APIARY_IMAGE_PREFIX=ghcr.io/example/apiary", ENV_EXAMPLE.read_text(),
                      count=1, flags=re.MULTILINE)
    env_text = re.sub(r"^APIARY_PULL_POLICY=.*$", f"APIARY_PULL_POLICY={policy}", env_text, count=1, flags=re.MULTILINE)
    (tmp_path / "registry.env").write_text(env_text)
    doc = bundle(*FILES, env=read_env_file(tmp_path / "registry.env"))
    assert errors(doc) == []
    for name in SERVICES:
        assert doc["services"][name]["pull_policy"] == policy
        assert doc["services"][name]["image"].startswith(f"ghcr.io/example/apiary/{name}:{VERSION}")
    rendered = docker_compose_config(FILES, env_text, tmp_path)["services"]  # 1.29 checks, then drops, pull_policy
    assert rendered["trainer"]["image"] == f"ghcr.io/example/apiary/trainer:{VERSION}-cuda"


@pytest.mark.parametrize("files", [(COMPOSE_FILE,), FILES], ids=["cpu", "gpu"])
def test_docker_compose_accepts_the_bundle(files: tuple[Path, ...], tmp_path: Path) -> None:
    services = docker_compose_config(files, ENV_EXAMPLE.read_text(), tmp_path)["services"]
    assert set(services) == {*SERVICES, "redis", "prometheus", "grafana", "monitor"}
    assert services["averager"]["environment"]["APIARY_RUN_ID"] == "my-run"


def test_every_service_speaks_tls_by_default_in_an_open_run() -> None:
    services = bundle(*FILES)["services"]
    for name in SERVICES:
        env = services[name]["environment"]
        assert env["APIARY_TLS"] == "true", name
        # empty: unset for the CLI, so an open run; the token file it names is empty
        assert env["APIARY_RUN_AUTHORITY"] == "" and env["APIARY_ACCESS_TOKEN"] == SECRET_TOKEN, name
        assert (REPO / token_file(bundle(*FILES), name)).read_bytes() == b"", name
    plaintext = bundle(COMPOSE_FILE, env={**read_env_file(ENV_EXAMPLE), "APIARY_TLS": "false"})["services"]
    assert {name: plaintext[name]["environment"]["APIARY_TLS"] for name in SERVICES} == dict.fromkeys(SERVICES, "false")


def test_each_service_has_its_own_identity_as_a_secret_so_its_own_token_entry() -> None:
    doc = bundle(*FILES)
    for name in SERVICES:
        assert doc["services"][name]["environment"]["APIARY_IDENTITY"] == SECRET_IDENTITY, name
        assert "/var/lib/apiary/identity" not in mounts(doc["services"][name]), name  # no key on a volume
    assert {name: identity_file(doc, name) for name in SERVICES} == {name: f"./secrets/{name}.key" for name in SERVICES}
    assert set(TOKEN_ENTRIES.values()) | set(IDENTITY_ENTRIES.values()) <= set(read_env_file(ENV_EXAMPLE))


def test_the_identity_script_makes_each_services_key_once_and_prints_its_peer_id(tmp_path: Path) -> None:
    """`sh deploy/identities.sh`, as .env.example says: apiary's own key format and peer ids, a
    private folder, keys the containers' user can read, existing keys kept."""
    folder = tmp_path / "secrets"
    printed = make_identities(folder)
    assert printed == {name: Identity.load(folder / f"{name}.key").peer_id for name in SERVICES}
    assert len(set(printed.values())) == len(SERVICES)
    assert folder.stat().st_mode & 0o777 == 0o700
    assert {(folder / f"{name}.key").stat().st_mode & 0o777 for name in SERVICES} == {0o644}
    (folder / "trainer.key").unlink()
    again = make_identities(folder)
    assert {k: v for k, v in again.items() if k != "trainer"} == {k: v for k, v in printed.items() if k != "trainer"}
    assert again["trainer"] not in printed.values()  # a fresh one where the file was missing


def test_in_a_private_run_each_service_gets_the_authority_and_its_own_token(tmp_path: Path) -> None:
    authority = Identity.generate().peer_id
    env_file = tmp_path / "private.env"
    env_file.write_text(private_run_env_file(authority))
    doc = bundle(*FILES, env=read_env_file(env_file))
    for name in SERVICES:
        env = doc["services"][name]["environment"]
        assert env["APIARY_RUN_AUTHORITY"] == authority, name
        assert env["APIARY_ACCESS_TOKEN"] == SECRET_TOKEN, name  # the file, never the token itself
        assert token_file(doc, name) == f"./secrets/{name}.token", name
        assert env["APIARY_TLS"] == "true", name


@pytest.mark.parametrize("files", [(COMPOSE_FILE,), FILES], ids=["cpu", "gpu"])
def test_docker_compose_hands_each_service_the_authority_and_its_own_token(files: tuple[Path, ...],
                                                                           tmp_path: Path) -> None:
    authority = Identity.generate().peer_id
    doc = docker_compose_config(files, private_run_env_file(authority), tmp_path)
    for name in SERVICES:
        env = doc["services"][name]["environment"]
        assert env["APIARY_RUN_AUTHORITY"] == authority, name
        assert env["APIARY_ACCESS_TOKEN"] == SECRET_TOKEN, name
        assert "apiary-token" not in json.dumps(env)  # no token text in what `docker inspect` shows
        assert token_file(doc, name) == str(REPO / "secrets" / f"{name}.token"), name
        assert env["APIARY_TLS"] == "true", name


def _documented_commands() -> list[tuple[str, list[str]]]:
    """(`apiary` sub-command, options) of every keygen and token command that .env.example and
    docs/deploy.md tell an operator to run."""
    found = []
    for path in (ENV_EXAMPLE, DOCS):
        for match in re.finditer(r"\b(keygen|token (?:authority|issue|show))\b([^`#\n]*)", path.read_text()):
            found.append((match.group(1), re.findall(r"(?<!\S)--[a-z-]+", match.group(2))))
    return found


def test_the_documented_private_run_commands_are_the_clis() -> None:
    documented = _documented_commands()
    assert {command for command, _ in documented} >= {"keygen", "token authority", "token issue", "token show"}
    for command, options in documented:
        click_command = commands()[command.split()[0]]
        if " " in command:
            click_command = click_command.commands[command.split()[1]]
        known = {option for param in click_command.params for option in param.opts}
        assert set(options) <= known, f"apiary {command}: no {sorted(set(options) - known)}"


def test_the_documented_private_run_steps_admit_each_service_with_its_own_token(tmp_path: Path) -> None:
    """The steps of .env.example with the real CLI: an authority, a key per service, a token per
    key; each service starts with its own token (the check it makes at start), not another's."""
    runner = CliRunner()

    def apiary(*args: str) -> str:
        result = runner.invoke(app, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    authority_key = str(tmp_path / "authority.key")
    authority = re.search(r"run authority: (\S+)", apiary("token", "authority", "--create", "--authority-key",
                                                          authority_key)).group(1)
    tokens = {}
    for name, peer_id in make_identities(tmp_path).items():
        tokens[name] = tmp_path / f"{name}.token"
        apiary("token", "issue", "--authority-key", authority_key, "--peer-id", peer_id, "--expires-in", "2592000",
               "--output", str(tokens[name]))
    for name in SERVICES:
        identity = Identity.load(tmp_path / f"{name}.key")
        for token in (str(tokens[name]), tokens[name].read_text().strip()):  # a file or the text (.env)
            assert CallCredentials.for_run(authority, token, identity) is not None
        other = SERVICES[(SERVICES.index(name) + 1) % len(SERVICES)]
        with pytest.raises(CredentialsError, match="start it with the identity file the token was issued for"):
            CallCredentials.for_run(authority, str(tokens[other]), identity)


def test_the_dht_relays_for_peers_behind_nat_by_default() -> None:
    dht = bundle(COMPOSE_FILE)["services"]["dht"]
    env = dht["environment"]
    assert env["APIARY_RELAY"] == "true" and env["APIARY_REACHABILITY"] == "auto"
    assert f"{env['APIARY_RELAY_PORT']}:{env['APIARY_RELAY_PORT']}" in dht["ports"]
    assert read_env_file(ENV_EXAMPLE)["APIARY_ANNOUNCE_HOST"] == ""  # learned from what peers observe


def test_the_relays_limits_reach_the_dht_and_left_empty_are_its_defaults() -> None:
    variables = {"APIARY_" + name.upper(): name for name in RELAY_LIMITS}
    for given in ({}, {"APIARY_RELAY_MAX_CIRCUITS": "40", "APIARY_RELAY_IDLE_TIMEOUT": "60"}):
        env = bundle(COMPOSE_FILE, env={**read_env_file(ENV_EXAMPLE), **given})["services"]["dht"]["environment"]
        assert {variable: env[variable] for variable in variables} == {v: given.get(v, "") for v in variables}
        with pytest.MonkeyPatch.context() as patch:
            for variable, value in env.items():
                patch.setenv(variable, str(value))
            with commands()["dht"].make_context("dht", []) as context:
                parsed = {name: context.params[name] for name in RELAY_LIMITS}
        expected = {name: WireSettings.model_fields[name].default for name in RELAY_LIMITS}
        assert parsed == expected | ({"relay_max_circuits": 40, "relay_idle_timeout": 60.0} if given else {})


def test_the_open_runs_empty_token_file_is_no_token_and_a_real_one_still_needs_an_authority(tmp_path: Path) -> None:
    from apiary.wire import WireSettings

    empty = REPO / token_file(bundle(COMPOSE_FILE), "dht")
    assert WireSettings(access_token=str(empty)).run_authority is None  # an open run starts
    token = tmp_path / "dht.token"
    token.write_text("apiary-token-v1.anything\n")
    with pytest.raises(ValueError, match="run_authority is not"):
        WireSettings(access_token=str(token))

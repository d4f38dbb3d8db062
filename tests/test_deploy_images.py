"""The images' definitions against the code: each target's entry command is a command of
the real CLI, its settings are options that command reads, its health check asks a route the
admin endpoint serves; and the shared health probe works against a running service."""

from __future__ import annotations

import subprocess
import sys

import pytest
from service_processes import ServiceProcesses, free_port

from deploy.images import torch_pin
from deploy.cli import admin_routes, commands, console_scripts, env_vars
from deploy.files import (
    COMPOSE_FILE, ENV_EXAMPLE, DOCKERFILE, REPO, SERVICES, Dockerfile, image_definition, load_compose, read_env_file,
)

HEALTHCHECK_SCRIPT = REPO / "services" / "healthcheck.py"
IN_IMAGE = "/opt/apiary/healthcheck.py"
GPU_SERVICES = ("expert-server", "trainer")
TORCH_SERVICES = ("averager", "expert-server", "trainer")


@pytest.mark.parametrize("service", SERVICES)
def test_the_entry_command_is_the_services_cli_command(service: str) -> None:
    entrypoint = image_definition(service).entrypoint
    assert console_scripts()[entrypoint[0]] == "apiary.cli.main:main"
    assert entrypoint[1:] == [service]
    assert service in commands(), f"`apiary {service}` is not a command of the CLI"


@pytest.mark.parametrize("service", SERVICES)
def test_the_image_sets_only_settings_its_command_reads(service: str) -> None:
    image_env = {k for k in image_definition(service).env if k.startswith("APIARY_")}
    assert {"APIARY_ADMIN_HOST", "APIARY_ADMIN_PORT"} <= image_env
    assert image_env - env_vars(service) == set()


@pytest.mark.parametrize("service", SERVICES)
def test_compose_sets_only_settings_the_command_reads(service: str) -> None:
    compose = load_compose(COMPOSE_FILE, env=read_env_file(ENV_EXAMPLE))[0]["services"][service]
    assert set(compose["environment"]) - env_vars(service) == set()


@pytest.mark.parametrize("service", SERVICES)
def test_the_health_check_asks_the_admin_endpoint_in_the_image_and_in_compose(service: str) -> None:
    dockerfile = image_definition(service)
    assert ["services/healthcheck.py", f"/code{IN_IMAGE}"] in dockerfile.copies  # with the code, copied to /
    assert dockerfile.healthcheck[:2] == ["python", IN_IMAGE]
    assert dockerfile.healthcheck[2] in admin_routes()
    assert dockerfile.env["APIARY_ADMIN_HOST"] == "0.0.0.0"  # Prometheus scrapes it from other containers
    compose = load_compose(COMPOSE_FILE, env=read_env_file(ENV_EXAMPLE))[0]["services"][service]
    assert compose["healthcheck"]["test"] == ["CMD", *dockerfile.healthcheck]


@pytest.mark.parametrize("service", SERVICES)
def test_images_are_multi_stage_non_root_and_take_their_base_as_an_argument(service: str) -> None:
    dockerfile = image_definition(service)
    assert dockerfile.args["BASE_IMAGE"]  # a public default, replaceable (the container tests build on Debian)
    assert dockerfile.stages[0] == "${BASE_IMAGE} AS python"
    assert len(dockerfile.stages) >= 3 and dockerfile.user == "10001:10001"
    assert "PIP_INSTALL_ARGS" in dockerfile.args


def test_the_dht_image_carries_no_torch() -> None:
    dockerfile = image_definition("dht")
    installs = " ".join(run for run in dockerfile.runs if "pip install" in run)
    assert "torch" not in installs and "ml.txt" not in installs and "/requirements/base.txt" in installs
    assert not any(stage.startswith(("torch", "ml")) for stage in dockerfile.stages)


def test_every_image_builds_on_one_python_slim_base() -> None:
    for service in SERVICES:
        dockerfile = image_definition(service)
        assert dockerfile.args["BASE_IMAGE"] == "python:3.11-slim-bookworm", service  # CPU and GPU alike
    assert "nvidia/cuda" not in DOCKERFILE.read_text()


def _index(dockerfile: Dockerfile, instruction: str, text: str) -> int:
    return next(i for i, (name, rest) in enumerate(dockerfile.instructions) if name == instruction and text in rest)


@pytest.mark.parametrize("service", TORCH_SERVICES)
def test_torch_is_pinned_as_the_makefile_pins_it_in_a_layer_before_the_code(service: str) -> None:
    dockerfile = image_definition(service)
    assert dockerfile.args["TORCH_VERSION"] == torch_pin()
    torch_layer = _index(dockerfile, "RUN", '"torch==$TORCH_VERSION"')
    dependencies = _index(dockerfile, "RUN", "/requirements/ml.txt")
    final = dockerfile.instructions.index(("FROM", "python AS ml"))
    venv, code = (_index(dockerfile, "COPY", f"--from={stage} ") for stage in ("ml-deps", "code"))
    # the image copies the venv with torch and the dependencies, then the code: a change of the
    # code reuses the torch and dependency layers
    assert torch_layer < dependencies and final < venv < code
    dependency_stages = Dockerfile.read(DOCKERFILE, "ml-deps")  # what the torch and dependency layers are built from
    assert "torch" in " ".join(dependency_stages.runs) and not any(source[0] == "src/" for source in dependency_stages.copies)
    # nor does the torch layer depend on pyproject.toml: an edit of it (another extra, the version)
    # reinstalls no torch
    torch_stages = Dockerfile.read(DOCKERFILE, "torch")
    assert "torch==" in " ".join(torch_stages.runs) and all(source[0] != "pyproject.toml" for source in torch_stages.copies)


@pytest.mark.parametrize("service", GPU_SERVICES)
def test_gpu_services_build_on_cpu_by_default_and_with_torchs_cuda_wheel_by_argument(service: str) -> None:
    dockerfile = image_definition(service)
    assert dockerfile.args["DEVICE"] == "cpu"
    install = next(run for run in dockerfile.runs if "torch==" in run)
    assert "cpu) variant=cpu" in install and "cuda) variant=cu128" in install
    assert "$TORCH_INDEX_URL/$variant" in install


def test_the_images_share_their_stages_so_torch_is_installed_once() -> None:
    """One Dockerfile, a target per service: the averager, expert-server and trainer targets
    are the `ml` stage (torch, the dependencies, the code) with their own settings, and every
    install step is written once."""
    for service in TORCH_SERVICES:
        assert image_definition(service).stages[-2:] == ["python AS ml", f"ml AS {service}"]
    installs = [run for run in Dockerfile.read(DOCKERFILE).runs if "pip install" in run]
    assert len(installs) == len(set(installs))
    assert sum("torch==" in run for run in installs) == 1


def _probe(path: str, port: int) -> subprocess.CompletedProcess[str]:
    env = {"APIARY_ADMIN_HOST": "0.0.0.0", "APIARY_ADMIN_PORT": str(port), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(HEALTHCHECK_SCRIPT), path], env=env, capture_output=True, text=True,
                          timeout=30, check=False)


def test_the_health_probe_passes_for_a_serving_service_and_fails_with_a_reason() -> None:
    with ServiceProcesses() as services:
        dht = services.start("dht", "--new-swarm").wait_until_up()
        port = int(dht.admin.rsplit(":", 1)[1])
        assert _probe("/healthz", port).returncode == 0
        missing = _probe("/no-such-route", port)
        assert missing.returncode == 1 and "404" in missing.stderr
        closed = _probe("/healthz", free_port())
        assert closed.returncode == 1 and "/healthz" in closed.stderr

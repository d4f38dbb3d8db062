"""The images' definitions against the code: each Dockerfile's entry command is a command of
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
    COMPOSE_FILE, ENV_EXAMPLE, REPO, SERVICES, Dockerfile, dockerfile_path, load_compose, read_env_file,
)

HEALTHCHECK_SCRIPT = REPO / "services" / "healthcheck.py"
IN_IMAGE = "/opt/apiary/healthcheck.py"
GPU_SERVICES = ("expert-server", "trainer")
TORCH_SERVICES = ("averager", "expert-server", "trainer")


@pytest.mark.parametrize("service", SERVICES)
def test_the_entry_command_is_the_services_cli_command(service: str) -> None:
    entrypoint = Dockerfile.read(dockerfile_path(service)).entrypoint
    assert console_scripts()[entrypoint[0]] == "apiary.cli.main:main"
    assert entrypoint[1:] == [service]
    assert service in commands(), f"`apiary {service}` is not a command of the CLI"


@pytest.mark.parametrize("service", SERVICES)
def test_the_image_sets_only_settings_its_command_reads(service: str) -> None:
    image_env = {k for k in Dockerfile.read(dockerfile_path(service)).env if k.startswith("APIARY_")}
    assert {"APIARY_ADMIN_HOST", "APIARY_ADMIN_PORT"} <= image_env
    assert image_env - env_vars(service) == set()


@pytest.mark.parametrize("service", SERVICES)
def test_compose_sets_only_settings_the_command_reads(service: str) -> None:
    compose = load_compose(COMPOSE_FILE, env=read_env_file(ENV_EXAMPLE))[0]["services"][service]
    assert set(compose["environment"]) - env_vars(service) == set()


@pytest.mark.parametrize("service", SERVICES)
def test_the_health_check_asks_the_admin_endpoint_in_the_image_and_in_compose(service: str) -> None:
    dockerfile = Dockerfile.read(dockerfile_path(service))
    assert ["services/healthcheck.py", IN_IMAGE] in dockerfile.copies
    assert dockerfile.healthcheck[:2] == ["python", IN_IMAGE]
    assert dockerfile.healthcheck[2] in admin_routes()
    assert dockerfile.env["APIARY_ADMIN_HOST"] == "0.0.0.0"  # Prometheus scrapes it from other containers
    compose = load_compose(COMPOSE_FILE, env=read_env_file(ENV_EXAMPLE))[0]["services"][service]
    assert compose["healthcheck"]["test"] == ["CMD", *dockerfile.healthcheck]


@pytest.mark.parametrize("service", SERVICES)
def test_images_are_multi_stage_non_root_and_take_their_base_as_an_argument(service: str) -> None:
    dockerfile = Dockerfile.read(dockerfile_path(service))
    assert dockerfile.args["BASE_IMAGE"]  # a public default, replaceable (the container tests build on Debian)
    assert dockerfile.stages[0] == "${BASE_IMAGE} AS python"
    assert len(dockerfile.stages) >= 3 and dockerfile.user == "10001:10001"
    assert "PIP_INSTALL_ARGS" in dockerfile.args


def test_the_dht_image_carries_no_torch() -> None:
    dockerfile = Dockerfile.read(dockerfile_path("dht"))
    installs = " ".join(run for run in dockerfile.runs if "pip install" in run)
    assert "torch" not in installs and "[ml]" not in installs and "/src" in installs


def test_every_image_builds_on_one_python_slim_base() -> None:
    for service in SERVICES:
        dockerfile = Dockerfile.read(dockerfile_path(service))
        assert dockerfile.args["BASE_IMAGE"] == "python:3.11-slim-bookworm", service  # CPU and GPU alike
        assert "nvidia/cuda" not in dockerfile_path(service).read_text()


def _index(dockerfile: Dockerfile, instruction: str, text: str) -> int:
    return next(i for i, (name, rest) in enumerate(dockerfile.instructions) if name == instruction and text in rest)


@pytest.mark.parametrize("service", TORCH_SERVICES)
def test_torch_is_pinned_as_the_makefile_pins_it_in_a_layer_before_the_code(service: str) -> None:
    dockerfile = Dockerfile.read(dockerfile_path(service))
    assert dockerfile.args["TORCH_VERSION"] == torch_pin()
    torch_layer = _index(dockerfile, "RUN", '"torch==$TORCH_VERSION"')
    dependencies = _index(dockerfile, "RUN", '"/src[ml]"')
    code = _index(dockerfile, "COPY", "src/ /src/src/")
    assert torch_layer < dependencies < code  # a change of the code reuses the torch and dependency layers
    assert not any(rest.startswith("src/") for name, rest in dockerfile.instructions[:dependencies] if name == "COPY")


@pytest.mark.parametrize("service", GPU_SERVICES)
def test_gpu_services_build_on_cpu_by_default_and_with_torchs_cuda_wheel_by_argument(service: str) -> None:
    dockerfile = Dockerfile.read(dockerfile_path(service))
    assert dockerfile.args["DEVICE"] == "cpu"
    install = next(run for run in dockerfile.runs if "torch==" in run)
    assert "cpu) variant=cpu" in install and "cuda) variant=cu128" in install
    assert "$TORCH_INDEX_URL/$variant" in install


def test_the_images_torch_layer_is_the_same_so_built_once() -> None:
    """The averager, expert-server and trainer Dockerfiles share their first stages word for
    word, so a build reuses the torch layer of the image built before it."""
    shared = [Dockerfile.read(dockerfile_path(service)).instructions for service in TORCH_SERVICES]
    until = [_index(Dockerfile.read(dockerfile_path(service)), "RUN", '"/src[ml]"') for service in TORCH_SERVICES]
    assert len(set(until)) == 1 and all(s[: until[0] + 1] == shared[0][: until[0] + 1] for s in shared)


def _probe(path: str, port: int) -> subprocess.CompletedProcess[str]:
    env = {"APIARY_ADMIN_HOST": "0.0.0.0", "APIARY_ADMIN_PORT": str(port), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(HEALTHCHECK_SCRIPT), path], env=env, capture_output=True, text=True,
                          timeout=30, check=False)


def test_the_health_probe_passes_for_a_serving_service_and_fails_with_a_reason() -> None:
    with ServiceProcesses() as services:
        dht = services.start("dht").wait_until_up()
        port = int(dht.admin.rsplit(":", 1)[1])
        assert _probe("/healthz", port).returncode == 0
        missing = _probe("/no-such-route", port)
        assert missing.returncode == 1 and "404" in missing.stderr
        closed = _probe("/healthz", free_port())
        assert closed.returncode == 1 and "/healthz" in closed.stderr

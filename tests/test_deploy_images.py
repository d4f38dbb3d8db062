"""The images' definitions against the code: each Dockerfile's entry command is a command of
the real CLI, its settings are options that command reads, its health check asks a route the
admin endpoint serves; and the shared health probe works against a running service."""

from __future__ import annotations

import subprocess
import sys

import pytest
from service_processes import ServiceProcesses, free_port

from deploy.cli import admin_routes, commands, console_scripts, env_vars
from deploy.files import (
    COMPOSE_FILE, ENV_EXAMPLE, REPO, SERVICES, Dockerfile, dockerfile_path, load_compose, read_env_file,
)

HEALTHCHECK_SCRIPT = REPO / "services" / "healthcheck.py"
IN_IMAGE = "/opt/apiary/healthcheck.py"
GPU_SERVICES = ("expert-server", "trainer")


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


@pytest.mark.parametrize("service", GPU_SERVICES)
def test_gpu_images_build_on_cuda_by_default_and_on_cpu_by_argument(service: str) -> None:
    dockerfile = Dockerfile.read(dockerfile_path(service))
    assert dockerfile.args["BASE_IMAGE"].startswith("nvidia/cuda:") and "runtime" in dockerfile.args["BASE_IMAGE"]
    assert dockerfile.args["DEVICE"] == "cuda"
    install = next(run for run in dockerfile.runs if "torch" in run)
    for device in ("cuda", "cpu"):
        assert f'{device}) torch_index="$TORCH_{device.upper()}_INDEX_URL"' in install
    assert dockerfile.args["TORCH_CPU_INDEX_URL"].endswith("/cpu")


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

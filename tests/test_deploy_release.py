"""How images are made and published: `make images` builds the tags compose.yaml runs, and the
release workflow (which cannot run here) builds every image, multi-arch, with the tags the
bundle names, from a tag that is the package's version."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from deploy.files import COMPOSE_FILE, COMPOSE_GPU_FILE, ENV_EXAMPLE, REPO, SERVICES, Dockerfile, load_compose, \
    merge_compose, read_env_file

WORKFLOW = REPO / ".github" / "workflows" / "release.yml"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def _bundle_images(device: str) -> dict[str, str]:
    files = (COMPOSE_FILE, COMPOSE_GPU_FILE) if device == "cuda" else (COMPOSE_FILE,)
    merged: dict = {}
    for doc in load_compose(*files, env={**read_env_file(ENV_EXAMPLE), "APIARY_DEVICE": device}):
        merged = merge_compose(merged, doc)
    return {name: merged["services"][name]["image"] for name in SERVICES}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_make_images_builds_the_tags_the_bundle_runs(device: str, tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    recorder = tmp_path / "docker"
    recorder.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\n")
    recorder.chmod(0o755)
    subprocess.run(["make", "images", f"APIARY_DEVICE={device}", f"DOCKER={recorder}"], cwd=REPO, check=True,
                   capture_output=True, timeout=30)
    builds = [line.split() for line in (tmp_path / "calls").read_text().splitlines()]
    tags = {words[i + 1] for words in builds for i, word in enumerate(words) if word == "-t"}
    expected = _bundle_images(device)
    assert set(expected.values()) <= tags
    aliases = tags - set(expected.values())
    assert aliases and all(":latest" in tag for tag in aliases)  # latest only as an alias
    for words in builds:
        assert words[words.index("-f") + 1] == "services/Dockerfile"
        service = words[words.index("--target") + 1]
        assert Dockerfile.read(target=service).entrypoint == ["apiary", service]
        assert ("DEVICE=cuda" in words) == (device == "cuda" and service in ("expert-server", "trainer"))


def test_the_release_workflow_publishes_every_image_on_a_version_tag() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML 1.1 reads `on` as true
    assert triggers == {"push": {"tags": ["v*"]}}
    assert workflow["permissions"]["packages"] == "write"
    check = " ".join(step.get("run", "") for step in workflow["jobs"]["version"]["steps"])
    assert "pyproject.toml" in check and "GITHUB_REF_NAME" in check and "exit 1" in check
    images = workflow["jobs"]["images"]
    assert images["needs"] == "version"
    builds = images["strategy"]["matrix"]["include"]
    assert {(b["service"], b["device"]) for b in builds} == {
        *((s, "cpu") for s in SERVICES), ("expert-server", "cuda"), ("trainer", "cuda")}
    for build in builds:
        assert Dockerfile.read(target=build["service"]).entrypoint == ["apiary", build["service"]]
        assert "linux/amd64" in build["platforms"]
        if build["device"] == "cpu":
            assert "linux/arm64" in build["platforms"]  # multi-arch
    [push] = [step for step in images["steps"] if step.get("uses", "").startswith("docker/build-push-action@")]
    options = push["with"]
    assert options["push"] is True and options["file"] == "services/Dockerfile"
    assert options["target"] == "${{ matrix.service }}"
    assert options["build-args"] == "DEVICE=${{ matrix.device }}" and options["platforms"] == "${{ matrix.platforms }}"
    tags = options["tags"].strip().splitlines()
    # the tags of the bundle: <service>:<version><suffix>, with latest<suffix> as the alias
    assert [re.sub(r".*/apiary/\$\{\{ matrix.service \}\}:", "", tag) for tag in tags] == [
        "${{ needs.version.outputs.version }}${{ matrix.suffix }}", "latest${{ matrix.suffix }}"]
    cpu_images = _bundle_images("cpu")
    for build in builds:
        if build["device"] == "cpu":
            assert cpu_images[build["service"]].endswith(f":{VERSION}{build['suffix']}")
    gpu_images = _bundle_images("cuda")
    assert all(gpu_images[b["service"]].endswith(f":{VERSION}{b['suffix']}") for b in builds if b["device"] == "cuda")
    for job in workflow["jobs"].values():  # every action pinned to a major version
        assert all(re.fullmatch(r"[\w-]+/[\w-]+@v\d+", step["uses"]) for step in job["steps"] if "uses" in step)

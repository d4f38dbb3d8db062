"""The Helm chart rendered offline with Helm's own Go code (helm-python-sdk), as manifests."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

from deploy.files import REPO

CHART = REPO / "deploy" / "helm" / "apiary"
VALUES_FILES = {path.name.removesuffix("-values.yaml"): path for path in sorted((CHART / "ci").glob("*-values.yaml"))}
RELEASE, NAMESPACE = "demo", "swarm"
KUBE_VERSION = "v1.30.0"


def values_of(name: str | None) -> dict[str, Any] | None:
    """The values of ci/<name>-values.yaml (None: the chart's defaults alone)."""
    return yaml.safe_load(VALUES_FILES[name].read_text()) if name else None


def render(values: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every manifest the chart renders with these values (NOTES.txt left out)."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [doc for path, text in sorted(rendered.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def lint(values: dict[str, Any] | None) -> dict[str, Any]:
    return helm.lint(CHART, values, strict=True, kube_version=KUBE_VERSION)


def validate_values(values: dict[str, Any]) -> None:
    """Raises helm's HelmValuesError where the chart's values.schema.json refuses `values`."""
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)


def find(manifests: list[dict[str, Any]], kind: str, name_suffix: str) -> dict[str, Any]:
    matches = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"].endswith(name_suffix)]
    assert len(matches) == 1, f"{len(matches)} {kind} named *{name_suffix}: {[m['metadata']['name'] for m in manifests]}"
    return matches[0]


def pod_specs(manifests: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec) of every StatefulSet, Deployment and DaemonSet."""
    for manifest in manifests:
        if manifest["kind"] in ("StatefulSet", "Deployment", "DaemonSet"):
            yield manifest, manifest["spec"]["template"]["spec"]


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == name)


def env_of(container_spec: dict[str, Any]) -> dict[str, Any]:
    """A container's env: name -> value (or its valueFrom)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container_spec.get("env", [])}


def apiary_command(container_spec: dict[str, Any]) -> list[str] | None:
    """The `apiary <service>` a container runs: its command, or the `exec` line of a shell script."""
    command = container_spec.get("command", [])
    if command[:1] == ["apiary"]:
        return command
    if command[:2] == ["/bin/sh", "-c"]:
        script = "\n".join(container_spec.get("args", []))
        lines = [line.split()[1:] for line in script.splitlines() if line.strip().startswith("exec ")]
        return lines[-1] if lines and lines[-1][:1] == ["apiary"] else None  # Redis runs a script too
    return None


ANNOUNCE_FILE = "/run/apiary/announce/env"  # written by the announce init container (files/announce.py)


def start_as_pod(container_spec: dict[str, Any], pod_name: str, directory: Path,
                 announce: str = "export APIARY_ANNOUNCE_HOST='203.0.113.7'\n") -> dict[str, Any]:
    """What a container's shell script hands `apiary` in the pod named `pod_name`: {"argv": [...],
    "env": {APIARY_* -> value}}. The script runs in /bin/sh with the container's literal env and
    POD_NAME, `announce` as the file the announce init container writes, and an `apiary` on PATH
    that only reports how it was called."""
    command = container_spec.get("command", [])
    assert command[:2] == ["/bin/sh", "-c"], f"{container_spec['name']} runs no script: {command}"
    bin_dir = directory / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    fake = bin_dir / "apiary"
    fake.write_text('#!/bin/sh\nprintf "argv %s\\n" "apiary $*"\nenv | grep "^APIARY_"\n')
    fake.chmod(0o755)
    env = {e["name"]: e["value"] for e in container_spec.get("env", []) if "value" in e}
    env.update({"POD_NAME": pod_name, "PATH": f"{bin_dir}:/usr/bin:/bin"})
    announce_file = directory / "announce.env"
    announce_file.write_text(announce)
    script = "\n".join(container_spec["args"]).replace(ANNOUNCE_FILE, str(announce_file))
    result = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True,
                            text=True, timeout=30, check=True)
    lines = result.stdout.splitlines()
    assert lines and lines[0].startswith("argv "), result.stdout + result.stderr
    return {"argv": lines[0].removeprefix("argv ").split(), "env": dict(line.split("=", 1) for line in lines[1:])}

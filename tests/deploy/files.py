"""The deploy files as data: Dockerfiles, `.env` files and Compose files with variables filled in."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("dht", "averager", "expert-server", "trainer")
COMPOSE_FILE = REPO / "compose.yaml"
COMPOSE_GPU_FILE = REPO / "compose.gpu.yaml"
ENV_EXAMPLE = REPO / ".env.example"
COMPOSE_SCHEMA = REPO / "deploy" / "schemas" / "compose-spec.json"
IDENTITY_SCRIPT = REPO / "deploy" / "identities.sh"
# the .env entry of each service's identity file (its Compose secret /run/secrets/identity)
IDENTITY_ENTRIES = {name: f"APIARY_{name.upper().replace('-', '_')}_IDENTITY_FILE" for name in SERVICES}


DOCKERFILE = REPO / "services" / "Dockerfile"  # one target per service


@dataclass
class Dockerfile:
    """What the tests check of one target of a multi-stage Dockerfile (continuation lines joined):
    the instructions of the stages it is built from, those it copies from included."""

    args: dict[str, str] = field(default_factory=dict)  # every ARG with its default ("" without one)
    stages: list[str] = field(default_factory=list)  # the FROM lines
    copies: list[list[str]] = field(default_factory=list)  # COPY arguments (without --from copies)
    env: dict[str, str] = field(default_factory=dict)  # ENV of the target, inherited from its bases
    user: str = ""
    entrypoint: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)  # the CMD of HEALTHCHECK
    runs: list[str] = field(default_factory=list)
    instructions: list[tuple[str, str]] = field(default_factory=list)  # all of them, in file order

    @classmethod
    def read(cls, path: Path = DOCKERFILE, target: str | None = None) -> Dockerfile:
        """The target stage (the last one by default) of the Dockerfile at `path`."""
        instructions = _instructions(path.read_text())
        stages = _stages(instructions)
        target = target or list(stages)[-1]
        if target not in stages:
            raise KeyError(f"{path} has no stage {target!r} (stages: {sorted(stages)})")
        needed, chain = _needed(stages, target), _chain(stages, target)
        parsed = cls()
        for stage, stage_instructions in stages.items():
            if stage is None or stage in needed:
                parsed.instructions.extend(stage_instructions)
        for instruction, rest in parsed.instructions:
            if instruction == "ARG":
                name, _, default = rest.partition("=")
                parsed.args[name.strip()] = default.strip().strip('"')
            elif instruction == "FROM":
                parsed.stages.append(rest)
            elif instruction == "COPY" and not rest.startswith("--from"):
                parsed.copies.append(shlex.split(rest))
            elif instruction == "RUN":
                parsed.runs.append(rest)
        for instruction, rest in (pair for stage in chain for pair in stages[stage]):
            if instruction == "ENV":
                parsed.env.update(dict(part.split("=", 1) for part in shlex.split(rest)))
            elif instruction == "USER":
                parsed.user = rest
            elif instruction == "ENTRYPOINT":
                parsed.entrypoint = json.loads(rest)
            elif instruction == "HEALTHCHECK":
                parsed.healthcheck = json.loads(rest.split(" CMD ", 1)[1])
        return parsed


def image_definition(service: str) -> Dockerfile:
    """The target of services/Dockerfile that builds the service's image."""
    return Dockerfile.read(DOCKERFILE, service)


def _stages(instructions: list[tuple[str, str]]) -> dict[str | None, list[tuple[str, str]]]:
    """Stage name -> its instructions, FROM first (None: the global ARGs before the first FROM)."""
    stages: dict[str | None, list[tuple[str, str]]] = {None: []}
    current: str | None = None
    for instruction, rest in instructions:
        if instruction == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else f"#{len(stages)}"
            stages[current] = []
        stages[current].append((instruction, rest))
    return stages


def _base(stages: dict[str | None, list[tuple[str, str]]], stage: str) -> str | None:
    """The stage `stage` is FROM, or None when it starts from an image."""
    base = stages[stage][0][1].split(" AS ")[0].strip()
    return base if base in stages else None


def _chain(stages: dict[str | None, list[tuple[str, str]]], target: str) -> list[str]:
    """The target and the stages it is FROM, the first base first."""
    chain = [target]
    while (base := _base(stages, chain[-1])) is not None:
        chain.append(base)
    return chain[::-1]


def _needed(stages: dict[str | None, list[tuple[str, str]]], target: str) -> set[str]:
    """Every stage the target is built from: its bases and the stages it copies from, recursively."""
    needed, todo = set(), [target]
    while todo:
        stage = todo.pop()
        if stage in needed:
            continue
        needed.add(stage)
        todo.extend(_chain(stages, stage))
        todo.extend(rest.split()[0].removeprefix("--from=") for instruction, rest in stages[stage]
                    if instruction == "COPY" and rest.startswith("--from="))
    return needed


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    result = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, rest = line.strip().partition(" ")
            result.append((instruction.upper(), " ".join(rest.split())))
    return result


def make_identities(folder: Path) -> dict[str, str]:
    """Runs `sh deploy/identities.sh <folder>` as .env.example says; the service -> peer id lines
    it prints. Skips the test where openssl is missing."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: deploy/identities.sh needs it")
    result = subprocess.run(["sh", str(IDENTITY_SCRIPT), str(folder)], capture_output=True, text=True, timeout=60,
                            check=True)
    return dict(line.split() for line in result.stdout.splitlines())


def identity_settings(folder: Path) -> dict[str, str]:
    """The .env entries naming the identity files that `make_identities(folder)` made."""
    make_identities(folder)
    return {entry: str(folder / f"{name}.key") for name, entry in IDENTITY_ENTRIES.items()}


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a `.env` file (comments and blank lines skipped)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class MissingVariable(ValueError):
    """A `${VAR:?message}` whose variable is unset or empty."""


def variables_used(text: str) -> set[str]:
    """Names of every `${VAR...}` in a Compose file."""
    return {m.group("name") for m in _VARIABLE.finditer(text) if m.group("name")}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Fills in `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`, `${VAR?err}` and `$$`
    as Compose does."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op and op.endswith("?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        if op and op.endswith("-") and unset:
            return arg
        return value or ""

    return _VARIABLE.sub(replace, text)


def load_compose(*paths: Path, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Each Compose file as YAML with, when `env` is given, the variables in its strings filled
    in after parsing, as Compose does (so `${FLAG:-false}` stays the string "false")."""
    docs = [yaml.safe_load(path.read_text()) for path in paths]
    return docs if env is None else [_interpolate_strings(doc, env) for doc in docs]


def _interpolate_strings(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: _interpolate_strings(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate_strings(value, env) for value in node]
    return interpolate(node, env) if isinstance(node, str) else node


def merge_compose(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """An overlay merged into a base file: mappings merge key by key, the rest is replaced."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_compose(merged[key], value)
        else:
            merged[key] = value
    return merged

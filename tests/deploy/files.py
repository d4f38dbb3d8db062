"""The deploy files as data: Dockerfiles, `.env` files and Compose files with variables filled in."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("dht", "averager", "expert-server", "trainer")
COMPOSE_FILE = REPO / "compose.yaml"
COMPOSE_GPU_FILE = REPO / "compose.gpu.yaml"
ENV_EXAMPLE = REPO / ".env.example"
COMPOSE_SCHEMA = REPO / "deploy" / "schemas" / "compose-spec.json"


def dockerfile_path(service: str) -> Path:
    return REPO / "services" / service / "Dockerfile"


@dataclass
class Dockerfile:
    """The instructions of a Dockerfile that the tests check (continuation lines joined)."""

    args: dict[str, str] = field(default_factory=dict)  # every ARG with its default ("" without one)
    stages: list[str] = field(default_factory=list)  # the FROM lines
    copies: list[list[str]] = field(default_factory=list)  # COPY arguments (without --from copies)
    env: dict[str, str] = field(default_factory=dict)  # ENV of the final stage
    user: str = ""
    entrypoint: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)  # the CMD of HEALTHCHECK
    runs: list[str] = field(default_factory=list)
    instructions: list[tuple[str, str]] = field(default_factory=list)  # all of them, in order

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        parsed = cls()
        parsed.instructions = _instructions(path.read_text())
        for instruction, rest in parsed.instructions:
            if instruction == "ARG":
                name, _, default = rest.partition("=")
                parsed.args[name.strip()] = default.strip().strip('"')
            elif instruction == "FROM":
                parsed.stages.append(rest)
                parsed.env = {}
            elif instruction == "COPY" and not rest.startswith("--from"):
                parsed.copies.append(shlex.split(rest))
            elif instruction == "ENV":
                parsed.env.update(dict(part.split("=", 1) for part in shlex.split(rest)))
            elif instruction == "USER":
                parsed.user = rest
            elif instruction == "ENTRYPOINT":
                parsed.entrypoint = json.loads(rest)
            elif instruction == "HEALTHCHECK":
                parsed.healthcheck = json.loads(rest.split(" CMD ", 1)[1])
            elif instruction == "RUN":
                parsed.runs.append(rest)
        return parsed


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    result = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, rest = line.strip().partition(" ")
            result.append((instruction.upper(), " ".join(rest.split())))
    return result


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

"""What the real code offers, for the drift checks: the `apiary` commands and their environment
variables (from the typer app), the console script, and the admin endpoint's routes."""

from __future__ import annotations

import tomllib

from typing import Any

import typer

from apiary.cli.main import app
from apiary.telemetry import AdminServer, new_registry
from deploy.files import REPO


def commands() -> dict[str, Any]:
    """`apiary` sub-command name -> its (typer) click command."""
    return dict(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def env_vars(command: str) -> set[str]:
    """The APIARY_* variables `apiary <command>` reads (every option's envvar, its own and those
    of the process, e.g. APIARY_LOG_LEVEL)."""
    found = commands().get(command)
    assert found is not None, f"`apiary {command}` is not a command of the CLI (commands: {sorted(commands())})"
    names: set[str] = set()
    for param in [*found.params, *typer.main.get_command(app).params]:
        if isinstance(param.envvar, str):
            names.add(param.envvar)
        elif param.envvar:
            names.update(param.envvar)
    return names


def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def admin_routes() -> set[str]:
    """The GET routes every service's admin endpoint serves."""
    server = AdminServer("probe", registry=new_registry())
    return {route.path for route in server.app.routes if "GET" in getattr(route, "methods", ())}

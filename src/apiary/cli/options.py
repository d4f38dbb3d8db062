"""Options that are both a flag and an `APIARY_*` environment variable with the same meaning."""

from __future__ import annotations

from typing import Any

import typer

ENV_PREFIX = "APIARY_"


def env_name(flag: str) -> str:
    """The environment variable of a flag: `--initial-peers` -> `APIARY_INITIAL_PEERS`."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def option(flag: str, help: str, **kwargs: Any) -> Any:
    """A typer option named `flag` that also reads `APIARY_<FLAG>` from the environment."""
    return typer.Option(flag, help=help, envvar=env_name(flag), show_envvar=True, **kwargs)

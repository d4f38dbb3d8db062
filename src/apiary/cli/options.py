"""Options that are both a flag and an `APIARY_*` environment variable with the same meaning,
and the security options every service with public ports shares."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

ENV_PREFIX = "APIARY_"


def env_name(flag: str) -> str:
    """The environment variable of a flag: `--initial-peers` -> `APIARY_INITIAL_PEERS`."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def option(flag: str, help: str, **kwargs: Any) -> Any:
    """A typer option named `flag` that also reads `APIARY_<FLAG>` from the environment."""
    return typer.Option(flag, help=help, envvar=env_name(flag), show_envvar=True, **kwargs)


TlsOption = Annotated[bool, option("--tls", "TLS on the public ports, each server proving its peer id (dial peer_id@host:port)")]
RunAuthorityOption = Annotated[Optional[str], option("--run-authority", "private run: the peer id of the run's authority (none: an open run)")]
AccessTokenOption = Annotated[Optional[str], option("--access-token", "private run: this peer's access token, or the file holding it (`apiary token issue`)")]

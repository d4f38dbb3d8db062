"""The `apiary` entry point. Errors in flags or settings end the command with one clear line."""

from __future__ import annotations

import sys
from typing import Annotated

import pydantic
import typer

from apiary.cli.averager import averager_command
from apiary.cli.basics import keygen_command, ping_command, version_command
from apiary.cli.dht import dht_command
from apiary.cli.doctor import doctor_command
from apiary.cli.expert_server import expert_server_command
from apiary.cli.monitor import monitor_command, status_command
from apiary.cli.options import CommandError, option
from apiary.cli.token import token_app
from apiary.cli.trainer import trainer_command
from apiary.cli.up import up_command
from apiary.dht import DHTBootstrapError
from apiary.dht.storage import StorageUnavailable
from apiary.faults import FaultPlan, FaultSpecError, install
from apiary.logs import LogError, configure as configure_logs
from apiary.wire import AddressError, IdentityError, WireError

app = typer.Typer(
    name="apiary",
    help="Train one large PyTorch model on many computers over the internet, with no master node.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command("version")(version_command)
app.command("keygen")(keygen_command)
app.command("ping")(ping_command)
app.command("up")(up_command)
app.command("dht")(dht_command)
app.command("averager")(averager_command)
app.command("expert-server")(expert_server_command)
app.command("trainer")(trainer_command)
app.command("monitor")(monitor_command)
app.command("status")(status_command)
app.command("doctor")(doctor_command)
app.add_typer(token_app, name="token")


@app.callback()
def process_options(
    faults: Annotated[str, option("--faults", "test tool: failure injection plan, POINT=INDEX:ACTION,... "
                                  "(apiary.faults)", hidden=True)] = "",
    log_level: Annotated[str, option("--log-level", "lowest level logged: debug, info, warning or error")] = "info",
    log_format: Annotated[str, option("--log-format", "text, or json: one JSON object per line, "
                                      "stdout's lines included")] = "text",
) -> None:
    """Options of the process, before the command: logging, and the failure injection plan (tests only)."""
    try:
        configure_logs(log_level, log_format)
    except LogError as e:
        raise typer.BadParameter(str(e), param_hint="'--log-level' / '--log-format'") from None
    try:
        install(FaultPlan.parse(faults))
    except FaultSpecError as e:
        raise typer.BadParameter(str(e), param_hint="'--faults' / APIARY_FAULTS") from None


def _one_line(error: pydantic.ValidationError) -> str:
    problems = [f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors()]
    return "invalid settings: " + "; ".join(problems)


def main(argv: list[str] | None = None) -> None:
    """Runs the CLI; a usage, settings or connection error prints `apiary: error: ...` and exits non-zero."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="apiary", standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as e:  # bad flags and values (no arguments: help was printed)
        message = e.format_message()
        if message:
            _fail(message, getattr(e, "exit_code", 2))
        sys.exit(getattr(e, "exit_code", 2))
    except pydantic.ValidationError as e:
        _fail(_one_line(e), 2)
    except (AddressError, IdentityError) as e:
        _fail(str(e), 2)
    except (CommandError, WireError, DHTBootstrapError, StorageUnavailable, OSError) as e:
        _fail(str(e), 1)


def _fail(message: str, code: int) -> None:
    print(f"apiary: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()

"""The relay's limits on the command line: a flag and an APIARY_* variable each, on every service
that can relay, bounded as `WireSettings` bounds them; a bad value is one clear line naming it.
(That the values reach a running relay: tests/test_net_relay_limits.py.)"""

from __future__ import annotations

import pytest
import typer

from apiary.cli.main import app, main
from apiary.cli.options import RELAY_LIMITS
from apiary.wire import WireSettings

SERVICES = ("dht", "expert-server", "averager", "trainer")


def test_every_relaying_service_takes_each_limit_as_a_flag_and_a_variable_with_the_settings_default() -> None:
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for service in SERVICES:
        params = {param.name: param for param in commands[service].params}
        for name in RELAY_LIMITS:
            param = params[name]
            assert param.opts == ["--" + name.replace("_", "-")], (service, param.opts)
            assert param.envvar == "APIARY_" + name.upper(), (service, param.envvar)
            assert param.default == WireSettings.model_fields[name].default, (service, name)


@pytest.mark.parametrize(("args", "env", "named"), [
    (["dht", "--new-swarm", "--relay-max-circuits", "0"], {}, "--relay-max-circuits"),
    (["dht", "--new-swarm", "--relay-max-reservations", "-3"], {}, "--relay-max-reservations"),
    (["averager", "--run-id", "r", "--initial-peers", "127.0.0.1:1"], {"APIARY_RELAY_MAX_CIRCUITS_PER_PEER": "0"},
     "APIARY_RELAY_MAX_CIRCUITS_PER_PEER"),
    (["expert-server", "--experts", "ffn.0.0", "--dht-local", "127.0.0.1:1", "--relay-bytes-per-second", "-1"], {},
     "--relay-bytes-per-second"),
    (["trainer", "--run-id", "r", "--new-swarm", "--relay-idle-timeout", "0"], {}, "--relay-idle-timeout"),
    (["dht", "--new-swarm"], {"APIARY_RELAY_RESERVATION_TIMEOUT": "soon"}, "APIARY_RELAY_RESERVATION_TIMEOUT"),
])
def test_a_bad_limit_is_one_clear_line_naming_it(args: list[str], env: dict[str, str], named: str,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as ended:
        main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert ended.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("apiary: error: Invalid value for") and named in lines[0], lines[0]

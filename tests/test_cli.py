"""The `apiary` command as an operator uses it: real processes, real sockets."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer

from apiary.cli.main import app
from apiary.cli.options import ENV_PREFIX
from apiary.wire import Identity

APIARY = [sys.executable, "-m", "apiary.cli.main"]
PEER = "a" * 52 + "@127.0.0.1:1"  # a well-formed address nobody answers at


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*APIARY, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_help_lists_the_subcommands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("version", "keygen", "ping", "up"):
        assert re.search(rf"^\W*{command}\b", result.stdout, re.MULTILINE), command


def test_version_prints_apiary_version() -> None:
    import apiary

    result = run("version")
    assert result.returncode == 0
    assert apiary.__version__ in result.stdout
    as_module = subprocess.run([sys.executable, "-m", "apiary", "version"], capture_output=True, text=True, timeout=60)
    assert as_module.returncode == 0 and as_module.stdout == result.stdout, as_module.stderr


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["up", "--peers", "many"], {}, "--peers"),
        (["up", "--peers", "0"], {}, "--peers"),
        (["up"], {"APIARY_PEERS": "abc"}, "APIARY_PEERS"),
        (["ping", "no-port-here"], {}, "no-port-here"),
        (["up", "--no-such-flag"], {}, "--no-such-flag"),
        (["up", "--peers", "2", "--clients", "2"], {}, "--clients"),
        (["trainer", "--run-id", "r"], {}, "--new-swarm"),  # neither: no silent one-node swarm
        (["trainer", "--run-id", "r"], {"APIARY_INITIAL_PEERS": ""}, "--new-swarm"),
        (["trainer", "--run-id", "r", "--new-swarm", "--initial-peers", PEER], {}, "--new-swarm starts one"),
        (["dht"], {}, "--initial-peers peer_id@host:port,... to join a swarm, or --new-swarm"),
        (["dht"], {"APIARY_INITIAL_PEERS": " "}, "--new-swarm"),
        (["dht", "--initial-peers", PEER], {"APIARY_NEW_SWARM": "true"}, "--new-swarm starts one"),
    ],
)
def test_a_bad_value_exits_nonzero_with_one_clear_line(args: list[str], env: dict[str, str], named: str) -> None:
    result = run(*args, env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("apiary: error:") and named in lines[0]


def test_every_option_is_also_an_apiary_environment_variable() -> None:
    command = typer.main.get_command(app)
    checked = 0
    for name, sub in command.commands.items():
        for param in sub.params:
            if param.param_type_name == "option" and param.name != "help":
                expected = ENV_PREFIX + param.name.upper()
                assert param.envvar == expected, f"apiary {name} {param.opts}: envvar {param.envvar!r}"
                checked += 1
    assert checked >= 5


def test_keygen_writes_an_identity_and_refuses_to_overwrite_it(tmp_path) -> None:
    path = tmp_path / "peer.id"
    first = run("keygen", "--identity", str(path))
    assert first.returncode == 0, first.stderr
    peer_id = Identity.load(path).peer_id
    assert peer_id in first.stdout
    assert path.stat().st_mode & 0o777 == 0o600

    again = run("keygen", env={"APIARY_IDENTITY": str(path)})
    assert again.returncode != 0
    assert "--force" in again.stderr and peer_id in again.stderr
    assert Identity.load(path).peer_id == peer_id

    forced = run("keygen", "--identity", str(path), "--force")
    assert forced.returncode == 0
    assert Identity.load(path).peer_id != peer_id


def test_ping_of_an_unreachable_peer_fails_cleanly() -> None:
    started = time.monotonic()
    result = run("ping", "127.0.0.1:1", "--timeout", "3")
    assert result.returncode == 1
    assert result.stderr.startswith("apiary: error:") and "UNAVAILABLE" in result.stderr
    assert time.monotonic() - started < 20


def test_up_trains_a_local_swarm_and_its_loss_falls() -> None:
    result = subprocess.run([*APIARY, "up", "--peers", "2", "--duration", "12", "--target-batch-size", "64"],
                            capture_output=True, text=True, timeout=150, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = re.search(r"loss ([0-9.]+) → ([0-9.]+); swarm samples/s (\d+); epochs (\d+)", result.stdout)
    assert match, result.stdout[-3000:]
    start, end, speed, epochs = float(match[1]), float(match[2]), int(match[3]), int(match[4])
    assert end < start - 0.5 and speed > 0 and epochs >= 2, result.stdout[-3000:]


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--task", "no_such_task"], {}, "no_such_task"),  # the trainer dies at start
        (["--task", "digits_moe"], {"APIARY_PORT": "BUSY"}, "BUSY"),  # its dht service cannot bind an exported port
    ],
)
def test_up_ends_with_the_failing_participants_own_error_line(args: list[str], env: dict[str, str], named: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        env = {key: value.replace("BUSY", port) for key, value in env.items()}
        result = run("up", "--peers", "2", "--duration", "5", *args, env=env, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("apiary: error:") and named.replace("BUSY", port) in lines[0], lines[0]


def _children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def test_ctrl_c_stops_the_local_swarm_and_still_reports(tmp_path) -> None:
    out = tmp_path / "out"
    with open(out, "w") as stdout:
        up = subprocess.Popen([*APIARY, "up", "--peers", "1", "--duration", "120", "--target-batch-size", "32"],
                              stdout=stdout, stderr=subprocess.PIPE, text=True, start_new_session=True,
                              env={**os.environ, "COLUMNS": "200"})
        deadline = time.monotonic() + 90
        while "swarm up" not in out.read_text() and time.monotonic() < deadline and up.poll() is None:
            time.sleep(0.3)
        participants = _children(up.pid)
        assert participants, out.read_text()
        os.killpg(up.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the whole foreground group
        _, stderr = up.communicate(timeout=60)
    assert up.returncode == 130, stderr
    assert stderr == "", stderr
    assert "stopping" in out.read_text() and "summary" in out.read_text(), out.read_text()
    assert not any(Path(f"/proc/{pid}").exists() for pid in participants)  # stopped and reaped


def test_shell_completion_script_completes_commands_options_and_choices(tmp_path) -> None:
    script = run("--show-completion", "bash")
    assert script.returncode == 0, script.stderr
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "apiary").exists()
    (tmp_path / "completion.sh").write_text(script.stdout)

    def complete(*words: str) -> list[str]:
        line = ("source completion.sh; COMP_WORDS=(" + " ".join(f"'{w}'" for w in words) + f"); "
                f"COMP_CWORD={len(words) - 1}; _apiary_completion apiary; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
        done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                              env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("apiary", "d") == ["dht", "doctor"]
    assert complete("apiary", "dht", "--initial") == ["--initial-peers"]
    assert complete("apiary", "dht", "--new") == ["--new-swarm"]
    assert complete("apiary", "averager", "--aggregation", "") == ["mean", "centered_clip", "trimmed_mean"]

    installed = run("--install-completion", "bash", env={"HOME": str(tmp_path)})
    assert installed.returncode == 0, installed.stderr
    assert "apiary" in (tmp_path / ".bashrc").read_text()

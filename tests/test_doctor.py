"""`apiary doctor` run as an operator runs it, on a `.env` of the bundle: each injected fault (a
port taken, a wrong announce host, an expiring token, images of another version) is named on
its own line with its fix, and the exit code counts the failed checks. Peers are real `apiary
dht` processes; the engine checks (images present) are in the container tests."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from service_processes import ServiceProcesses, free_port

from apiary.wire import Identity
from deploy.files import identity_settings

APIARY = [sys.executable, "-m", "apiary.cli.main"]
PORTS = ("APIARY_DHT_PORT", "APIARY_RELAY_PORT", "APIARY_AVERAGER_PORT", "APIARY_AVERAGER_BULK_PORT",
         "APIARY_EXPERT_SERVER_PORT", "APIARY_DHT_ADMIN_PORT", "APIARY_AVERAGER_ADMIN_PORT",
         "APIARY_EXPERT_SERVER_ADMIN_PORT", "APIARY_TRAINER_ADMIN_PORT")


def _env(tmp_path: Path, **settings: str) -> Path:
    """A .env with free ports and the identities made as .env.example says, then `settings`."""
    values = {port: str(free_port()) for port in PORTS}
    values.update(identity_settings(tmp_path / "secrets"))
    values.update(settings)
    path = tmp_path / ".env"
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    return path


def _doctor(env_file: Path) -> tuple[int, dict[str, list[str]]]:
    """The exit code, and the lines of each verdict (PASS, FAIL)."""
    result = subprocess.run([*APIARY, "doctor", "--env-file", str(env_file)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "DOCKER_HOST": "unix:///nonexistent.sock"})
    lines = result.stdout.splitlines()
    verdicts = {kind: [line for line in lines if line.startswith(kind)] for kind in ("PASS", "FAIL")}
    assert result.returncode == len(verdicts["FAIL"]), result.stdout + result.stderr  # the exit code counts
    return result.returncode, verdicts


def _failing(verdicts: dict[str, list[str]], check: str) -> list[str]:
    return [line for line in verdicts["FAIL"] if line.split()[1] == check]


def test_a_taken_port_is_named_with_its_setting_and_fix(tmp_path: Path) -> None:
    env_file = _env(tmp_path)
    port = int(re.search(r"APIARY_AVERAGER_BULK_PORT=(\d+)", env_file.read_text()).group(1))
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", port))
        taken.listen()
        _, verdicts = _doctor(env_file)
    [line] = _failing(verdicts, "ports")
    assert f"{port} (APIARY_AVERAGER_BULK_PORT) is taken" in line and "set another APIARY_AVERAGER_BULK_PORT" in line
    assert len([line for line in verdicts["PASS"] if line.split()[1] == "ports"]) == len(PORTS) - 1
    _, free = _doctor(env_file)  # the port given back: that check passes
    assert not _failing(free, "ports")


def test_without_an_engine_the_engine_and_images_fail_with_their_fixes(tmp_path: Path) -> None:
    code, verdicts = _doctor(_env(tmp_path))
    [engine] = _failing(verdicts, "engine")
    assert "no Docker engine answers" in engine and "DOCKER_HOST" in engine
    assert len(_failing(verdicts, "images")) == 4 and code == 5


def test_a_wrong_announce_host_is_named_against_what_peers_observe(tmp_path: Path) -> None:
    documentation = _doctor(_env(tmp_path, APIARY_ANNOUNCE_HOST="198.51.100.7"))[1]
    [line] = _failing(documentation, "announce")
    assert "APIARY_ANNOUNCE_HOST=198.51.100.7 is a documentation address" in line
    lan = _doctor(_env(tmp_path, APIARY_ANNOUNCE_HOST="10.9.8.7"))[1]  # a private run on a LAN may say so
    assert not _failing(lan, "announce")
    with ServiceProcesses() as services:
        peer = services.start("dht", "--new-swarm", "--plaintext").wait_until_up()
        _, verdicts = _doctor(_env(tmp_path, APIARY_ANNOUNCE_HOST="10.9.8.7", APIARY_TLS="false",
                                   APIARY_INITIAL_PEERS=peer.initial_peers))
        [line] = _failing(verdicts, "announce")
        assert "peers see this host at 127.0.0.1" in line and "APIARY_ANNOUNCE_HOST=127.0.0.1" in line
        [clock] = [line for line in verdicts["PASS"] if line.split()[1] == "clock"]
        assert "the farthest of 1 peers" in clock  # the peer's clock is this host's
        _, unset = _doctor(_env(tmp_path, APIARY_TLS="false", APIARY_INITIAL_PEERS=peer.initial_peers))
        [line] = [line for line in unset["PASS"] if line.split()[1] == "announce"]
        assert "announce what peers observe (peers see 127.0.0.1)" in line


def _token(tmp_path: Path, name: str, expires_in: int) -> str:
    authority_key = tmp_path / "authority.key"
    if not authority_key.exists():
        subprocess.run([*APIARY, "token", "authority", "--create", "--authority-key", str(authority_key)], check=True,
                       capture_output=True, timeout=60)
    subprocess.run([*APIARY, "token", "issue", "--authority-key", str(authority_key), "--peer-id",
                    Identity.generate().peer_id, "--expires-in", str(expires_in), "--output", str(tmp_path / name)],
                   check=True, capture_output=True, timeout=60)
    return name


@pytest.mark.timeout(240)
def test_tokens_expiring_soon_or_missing_fail_in_a_private_run(tmp_path: Path) -> None:
    files = {"APIARY_DHT_TOKEN_FILE": _token(tmp_path, "dht.token", 30 * 86400),
             "APIARY_AVERAGER_TOKEN_FILE": _token(tmp_path, "averager.token", 3600),
             "APIARY_EXPERT_SERVER_TOKEN_FILE": _token(tmp_path, "expert-server.token", 30 * 86400)}
    authority = Identity.load(tmp_path / "authority.key").peer_id
    _, verdicts = _doctor(_env(tmp_path, APIARY_RUN_AUTHORITY=authority, **files))
    failing = _failing(verdicts, "tokens")
    assert len(failing) == 2, failing
    assert "the averager's token is valid until" in failing[0] and "ask the organiser for a new token" in failing[0]
    assert "APIARY_TRAINER_TOKEN_FILE is empty" in failing[1]
    assert len([line for line in verdicts["PASS"] if line.split()[1] == "tokens"]) == 2


def test_a_missing_or_unreadable_identity_is_named_with_the_command_that_makes_it(tmp_path: Path) -> None:
    env_file = _env(tmp_path)
    assert not _failing(_doctor(env_file)[1], "identity")
    (tmp_path / "secrets" / "averager.key").unlink()
    (tmp_path / "secrets" / "trainer.key").chmod(0o600)
    _, verdicts = _doctor(env_file)
    missing, unreadable = _failing(verdicts, "identity")
    assert "APIARY_AVERAGER_IDENTITY_FILE" in missing and "does not exist" in missing
    assert "sh deploy/identities.sh" in missing
    assert "trainer.key is not readable by the containers' user" in unreadable and "chmod 644" in unreadable
    assert len([line for line in verdicts["PASS"] if line.split()[1] == "identity"]) == 2


def test_images_of_another_version_are_named(tmp_path: Path) -> None:
    _, verdicts = _doctor(_env(tmp_path, APIARY_IMAGE_TAG="0.0.1"))
    [line] = _failing(verdicts, "images")
    assert "APIARY_IMAGE_TAG=0.0.1, but this checkout is version" in line

"""The dht image and the Compose bundle in a real Docker engine (root; no image registry needed).

The base images are made from Debian packages (tests/deploy/images.py) and the dht image is
built from the dht target of services/Dockerfile on them. Two participants then run the dht service and
Redis from compose.yaml, each as its own Compose project with its own `.env`, announcing this
host's address as two machines would announce theirs (TLS on, as by default), in an open run
and in a private one set up with the steps of .env.example. Skipped, with the reason, where no
engine can be started; everything made here is removed afterwards (the base images stay
cached).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from apiary.dht import DHTNode, DHTSettings
from apiary.dht.node import DHTBootstrapError
from apiary.wire import Identity, PeerAddress, WireSettings
from apiary.wire.settings import default_route_address
from deploy.compose import ComposeProject, unused_ports
from deploy.engine import Engine, EngineUnavailable, docker_engine
from deploy.files import ENV_EXAMPLE, identity_settings, make_identities, read_env_file
from deploy.images import REDIS_IMAGE, build_service_image, ensure_base_images

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RUN = uuid.uuid4().hex[:8]
PREFIX = "apiary-test"
TAG = f"run-{RUN}"
DHT_IMAGE = f"{PREFIX}/dht:{TAG}"


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with ExitStack() as stack:
        try:
            engine = stack.enter_context(docker_engine())
            ensure_base_images(engine)
        except EngineUnavailable as reason:
            pytest.skip(f"no Docker engine can run here: {reason}")
        yield engine


@pytest.fixture(scope="module")
def dht_image(engine: Engine) -> Iterator[str]:
    """The dht image built from its Dockerfile; it and its build stages are removed afterwards."""
    before = set(engine.docker("images", "--all", "--quiet", "--no-trunc").stdout.split())
    try:
        build_service_image(engine, "dht", DHT_IMAGE)
        yield DHT_IMAGE
    finally:
        engine.docker("rmi", "--force", DHT_IMAGE, check=False)
        for _ in range(5):  # build stages: children before parents
            made = set(engine.docker("images", "--all", "--quiet", "--no-trunc").stdout.split()) - before
            if not made:
                break
            engine.docker("rmi", "--force", *made, check=False)


def test_dht_image_runs_apiary_dht_as_a_non_root_user_without_torch(engine: Engine, dht_image: str) -> None:
    config = engine.docker("image", "inspect", "--format", "{{json .Config.User}}", dht_image).stdout.strip()
    assert config == '"10001:10001"'
    usage = engine.docker("run", "--rm", dht_image, "--help").stdout
    assert "Usage: apiary dht" in usage
    probe = engine.docker("run", "--rm", "--entrypoint", "python", dht_image, "-c",
                          "import importlib.util, os; "
                          "print(importlib.util.find_spec('torch') is None, os.getuid())").stdout.split()
    assert probe == ["True", "10001"]


class Participant:
    """One participant's bundle: a Compose project with its own `.env` and published ports."""

    def __init__(self, engine: Engine, name: str, directory: Path, announce_host: str, initial_peers: str = ""):
        self.port, self.admin_port, relay_port = unused_ports(3)
        self.announce_host = announce_host
        self.settings = {**read_env_file(ENV_EXAMPLE), "APIARY_IMAGE_PREFIX": PREFIX, "APIARY_IMAGE_TAG": TAG,
                         "APIARY_REDIS_IMAGE": REDIS_IMAGE, "APIARY_ANNOUNCE_HOST": announce_host,
                         "APIARY_INITIAL_PEERS": initial_peers, "APIARY_NEW_SWARM": str(not initial_peers).lower(),
                         "APIARY_DHT_PORT": str(self.port),
                         "APIARY_DHT_ADMIN_PORT": str(self.admin_port), "APIARY_RELAY_PORT": str(relay_port),
                         **identity_settings(directory / f"{name}-secrets")}
        self.env_file = directory / f"{name}.env"
        self._write_env()
        self.project = ComposeProject(engine, f"{PREFIX}-{RUN}-{name}", self.env_file)

    def _write_env(self) -> None:
        self.env_file.write_text("".join(f"{key}={value}\n" for key, value in self.settings.items()))

    def join_private_run(self, authority: str, authority_key: Path) -> str:
        """The steps of .env.example for the dht: its peer id as deploy/identities.sh prints it (the
        key made before the first `up`), a token file issued for that peer id, named in .env.
        Returns the peer id."""
        peer_id = make_identities(Path(self.settings["APIARY_DHT_IDENTITY_FILE"]).parent)["dht"]
        token_file = self.env_file.with_suffix(".dht.token")
        _apiary("token", "issue", "--authority-key", str(authority_key), "--peer-id", peer_id,
                "--expires-in", "2592000", "--output", str(token_file))
        token_file.chmod(0o644)  # the file is mounted as a secret: the containers' user reads it
        self.settings.update(APIARY_RUN_AUTHORITY=authority, APIARY_DHT_TOKEN_FILE=str(token_file))
        self._write_env()
        return peer_id

    @property
    def public_address(self) -> str:
        return f"{self.status()['peer_id']}@{self.announce_host}:{self.port}"

    def admin(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5)

    def status(self) -> dict:
        response = self.admin("/status")
        response.raise_for_status()
        return response.json()

    def neighbours(self) -> set[str]:
        return {neighbour["peer_id"] for neighbour in self.status()["neighbours"]}

    def samples(self) -> list:
        response = self.admin("/metrics")
        response.raise_for_status()
        return [s for f in text_string_to_metric_families(response.text) for s in f.samples]

    def routing_table_nodes(self) -> float:
        return next(s.value for s in self.samples() if s.name == "apiary_dht_routing_table_nodes")

    def refused(self, reason: str) -> float:
        """Calls its public port refused for this reason (apiary.wire.auth.REASONS)."""
        return sum(s.value for s in self.samples()
                   if s.name.endswith("_rpc_rejected_total") and s.labels.get("reason") == reason)


def _apiary(*args: str) -> str:
    """The `apiary` CLI of this checkout, as the operator runs it on the host; its stdout."""
    result = subprocess.run([sys.executable, "-m", "apiary.cli.main", *args], capture_output=True, text=True,
                            timeout=60, check=False, env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 0, f"apiary {' '.join(args)}: {result.stderr}"
    return result.stdout


def _peer_id_in(output: str) -> str:
    """The peer id `apiary keygen` or `apiary token authority` printed (maybe in colour)."""
    match = re.search(r"(?:peer id|run authority): (?:\x1b\[[0-9;]*m)*([a-z2-7]{52})", output)
    assert match, output
    return match.group(1)


def _announce_host(engine: Engine) -> str:
    """This host's address, which containers of both projects reach through published ports."""
    address = default_route_address()
    if address.startswith("127."):
        address = engine.docker("network", "inspect", "bridge", "--format",
                                "{{(index .IPAM.Config 0).Gateway}}").stdout.strip()
    return address


def _wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(1)


async def _store(address: str, key: str, value: str, **credentials: object) -> bool:
    """Stores through the node at `address` as a DHT client (`credentials`: its identity and wire
    settings, in a private run)."""
    client = await DHTNode.launch([PeerAddress.parse(address)], settings=DHTSettings(client_mode=True), **credentials)
    try:
        return await client.store(key, value, expiration=time.time() + 600)
    finally:
        await client.shutdown()


async def _get(address: str, key: str, **credentials: object) -> object:
    client = await DHTNode.launch([PeerAddress.parse(address)], settings=DHTSettings(client_mode=True), **credentials)
    try:
        found = await client.get(key)
        return None if found is None else found.value
    finally:
        await client.shutdown()


def test_two_participants_dht_services_find_each_other_and_keep_records_across_a_restart(
    engine: Engine, dht_image: str, tmp_path: Path
) -> None:
    host = _announce_host(engine)
    first = Participant(engine, "a", tmp_path, host)
    second: Participant | None = None
    try:
        first.project.up("dht")
        first.project.wait_healthy("redis")
        first.project.wait_healthy("dht")
        assert first.status()["joined"] is True

        second = Participant(engine, "b", tmp_path, host, initial_peers=first.public_address)
        second.project.up("dht")
        second.project.wait_healthy("dht")
        a_id, b_id = first.status()["peer_id"], second.status()["peer_id"]
        _wait_for(lambda: b_id in first.neighbours() and a_id in second.neighbours(), "the two DHT nodes are neighbours")
        assert first.routing_table_nodes() >= 1 and second.routing_table_nodes() >= 1

        key, value = f"deploy-test-{RUN}", f"kept by both participants {RUN}"
        assert asyncio.run(_store(first.public_address, key, value)) is True

        started = second.project.inspect("dht")["State"]["StartedAt"]
        second.project.restart("dht")
        second.project.wait_healthy("dht", started_after=started)
        assert second.status()["peer_id"] == b_id  # its identity is its secret file
        _wait_for(lambda: a_id in second.neighbours(), "the restarted node rejoins its neighbour")

        first.project.stop("dht")  # only the restarted node (and its Redis) can answer now
        assert asyncio.run(_get(second.public_address, key)) == value
        assert second.routing_table_nodes() >= 1
    finally:
        for participant in (second, first):
            if participant is not None:
                participant.project.down()


def test_a_private_run_admits_the_participants_whose_keys_and_tokens_were_made_as_documented(
    engine: Engine, dht_image: str, tmp_path: Path
) -> None:
    authority_key = tmp_path / "authority.key"
    authority = _peer_id_in(_apiary("token", "authority", "--create", "--authority-key", str(authority_key)))
    host = _announce_host(engine)
    first = Participant(engine, "private-a", tmp_path, host)
    second: Participant | None = None
    try:
        a_id = first.join_private_run(authority, authority_key)
        first.project.up("dht")
        first.project.wait_healthy("dht")
        assert first.status()["peer_id"] == a_id  # the key keygen made, admitted by its token

        second = Participant(engine, "private-b", tmp_path, host, initial_peers=first.public_address)
        b_id = second.join_private_run(authority, authority_key)
        second.project.up("dht")
        second.project.wait_healthy("dht")
        _wait_for(lambda: b_id in first.neighbours() and a_id in second.neighbours(), "the two DHT nodes are neighbours")

        # a peer of the run (its own key and token) stores through one participant, reads through the other
        guest = Identity.generate()
        token = _apiary("token", "issue", "--authority-key", str(authority_key), "--peer-id", guest.peer_id,
                        "--expires-in", "600").strip()
        credentials = {"identity": guest, "wire": WireSettings(listen_host="127.0.0.1", bulk=False,
                                                               run_authority=authority, access_token=token)}
        key, value = f"private-{RUN}", f"for the run's peers only {RUN}"
        assert asyncio.run(_store(first.public_address, key, value, **credentials)) is True
        assert asyncio.run(_get(second.public_address, key, **credentials)) == value

        # a peer without a token is refused at the door
        with pytest.raises(DHTBootstrapError):
            asyncio.run(_get(first.public_address, key))
        assert first.refused("token_missing") >= 1
    finally:
        for participant in (second, first):
            if participant is not None:
                participant.project.down()

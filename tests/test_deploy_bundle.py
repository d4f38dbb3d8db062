"""The participant's bundle for real: all four images built (CPU variant, from the local base
image and wheelhouse: no download), two participants' full bundles (redis, dht, averager,
expert-server, trainer) from the real compose.yaml, each its own Compose project on its own
Docker network, reaching each other only through their published ports, as two hosts would.

They find each other; each trainer trains the default task, moe_lm, through both participants'
expert servers (found through its own dht; each server hosts a share, 16 of the tiny grid's 32
experts, chosen among those the other does not declare: with one trainer paused, both servers
still serve backward passes, the other trainer's); the averagers average together; the loss falls;
`restart trainer` resumes from the newest state, which its averager holds (the trainer hands
it its state at every epoch, so its checkpoint is never newer); `down` + `up` keeps the DHT's
records (Redis), the expert checkpoints and the averager's state; `apiary doctor` passes on this
host and names injected faults. Also: a task from APIARY_TASK_PATH, and one in an image derived
from the trainer's.

Identities are made as .env.example says (deploy/identities.sh) and published ports are picked
below the kernel's ephemeral range (deploy.compose.unused_ports): a port picked by binding port 0
could be taken by another process's outgoing connection before `up` publishes it, which failed
`up` once with Compose 1.29's "Host is already in use by another container".

Images stay in the engine (tagged apiary-test-bundle/<service>:<version>) so that later runs
reuse their layers; everything else made here is removed. Skipped, with the reason, where no
engine can run (root, Debian's docker.io and docker-compose, debootstrap).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.compose import ComposeProject, unused_ports
from deploy.engine import Engine, EngineUnavailable, docker_engine
from deploy.files import COMPOSE_FILE, ENV_EXAMPLE, REPO, SERVICES, identity_settings, read_env_file
from deploy.images import REDIS_IMAGE, build_service_image, ensure_base_images

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
PREFIX = "apiary-test-bundle"
RUN = uuid.uuid4().hex[:6]
VARIANT = {"expert-server": "-cpu", "trainer": "-cpu"}
PORTS = ("APIARY_DHT_PORT", "APIARY_RELAY_PORT", "APIARY_AVERAGER_PORT", "APIARY_AVERAGER_BULK_PORT",
         "APIARY_EXPERT_SERVER_PORT", "APIARY_DHT_ADMIN_PORT", "APIARY_AVERAGER_ADMIN_PORT",
         "APIARY_EXPERT_SERVER_ADMIN_PORT", "APIARY_TRAINER_ADMIN_PORT")
# What this test sets beyond .env, as an operator would in a compose.override.yaml of their own:
# short epochs, periods and checkpoints, so that minutes show what hours would.
OVERRIDE = {
    "services": {
        "trainer": {"environment": {"APIARY_TARGET_BATCH_SIZE": "256", "APIARY_CHECKPOINT_PERIOD": "5",
                                    "APIARY_EVALUATE_EVERY": "5", "APIARY_THREADS": "1", "APIARY_PROGRESS_EVERY": "5",
                                    "APIARY_AVERAGE_STATE_EVERY": "1"}},
        "averager": {"environment": {"APIARY_GATHER_SECONDS": "2", "APIARY_EXPECTED_PEERS": "2"}},
        "expert-server": {"environment": {"APIARY_CHECKPOINT_PERIOD": "5", "APIARY_DECLARE_PERIOD": "5"}},
    }
}
WAIT_S = 300.0
SHARE = 16  # experts each participant's server hosts: two participants split moe_lm's tiny grid of 32
# a restarted trainer takes the newest state; its checkpoint's only when no peer holds one as new
LOADED = re.compile(r"loaded the swarm's state of epoch (\d+)")


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
def images(engine: Engine) -> dict[str, str]:
    """The four images, CPU variant, tagged as compose.yaml names them with APIARY_IMAGE_PREFIX;
    kept afterwards (their layers make the next run's builds quick)."""
    built = {}
    for service in SERVICES:
        built[service] = f"{PREFIX}/{service}:{VERSION}{VARIANT.get(service, '')}"
        started = time.monotonic()
        build_service_image(engine, service, built[service])
        print(f"{service} image built in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return built


class Participant:
    """One participant's whole bundle: a Compose project with its own `.env` and published ports."""

    def __init__(self, engine: Engine, name: str, directory: Path, initial_peers: str = ""):
        self.name, self.engine = name, engine
        self.host = host_address(engine)
        self.settings = {**read_env_file(ENV_EXAMPLE), **dict(zip(PORTS, map(str, unused_ports(len(PORTS))))),
                         **identity_settings(directory / f"{name}-secrets"),
                         "APIARY_RUN_ID": f"bundle-{RUN}", "APIARY_IMAGE_PREFIX": PREFIX, "APIARY_REDIS_IMAGE": REDIS_IMAGE,
                         "APIARY_ANNOUNCE_HOST": self.host, "APIARY_REACHABILITY": "public",
                         "APIARY_INITIAL_PEERS": initial_peers, "APIARY_NEW_SWARM": str(not initial_peers).lower(),
                         "APIARY_NUM_EXPERTS": str(SHARE),
                         "APIARY_TASK_PATH": str(directory / "tasks")}
        (directory / "tasks").mkdir(exist_ok=True)
        self.env_file = directory / f"{name}.env"
        self.env_file.write_text("".join(f"{key}={value}\n" for key, value in self.settings.items()))
        override = directory / f"{name}.override.yaml"
        override.write_text(json.dumps(OVERRIDE))  # JSON is YAML
        self.project = ComposeProject(engine, f"{PREFIX}-{RUN}-{name}", self.env_file, files=(COMPOSE_FILE, override))

    def admin(self, service: str, path: str) -> Any:
        """`path` of the service's admin endpoint. Docker's port proxy can drop a connection while a
        container it leads to is unpaused or restarted: such a read is tried again, 3 times at most."""
        port = self.settings[f"APIARY_{service.upper().replace('-', '_')}_ADMIN_PORT"]
        for attempt in range(3):
            try:
                response = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
                break
            except httpx.TransportError:
                if attempt == 2:
                    raise
                time.sleep(2)
        response.raise_for_status()
        return response.json()

    @property
    def dht_address(self) -> str:
        return f"{self.admin('dht', '/status')['peer_id']}@{self.host}:{self.settings['APIARY_DHT_PORT']}"

    def logs(self, service: str) -> str:
        return self.project.compose("logs", "--no-color", service)

    def restarts(self, service: str) -> str:
        """How many times Docker restarted the service's container on its own (its restart policy)."""
        return self.engine.docker("inspect", "-f", "{{.RestartCount}}", self.project.container(service)).stdout.strip()

    def wait_healthy(self, *services: str, started_after: str = "") -> None:
        for service in services:
            self.project.wait_healthy(service, started_after=started_after, timeout=WAIT_S)

    def backward_passes(self) -> float:
        """Backward requests the expert server has served (from any trainer), by its /metrics."""
        port = self.settings["APIARY_EXPERT_SERVER_ADMIN_PORT"]
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == "apiary_expert_server_requests_total"
                   and sample.labels.get("method") == "backward" and sample.labels.get("status") == "ok")

    def redis_keys(self) -> int:
        return int(self.project.compose("exec", "-T", "redis", "redis-cli", "dbsize").strip())


def host_address(engine: Engine) -> str:
    """An address of this host that both bundles' containers dial the other's published ports at:
    the default bridge's gateway (any address of the host is; this one is private, as a LAN's
    would be, whatever the machine's own address is)."""
    return engine.docker("network", "inspect", "bridge", "--format", "{{(index .IPAM.Config 0).Gateway}}").stdout.strip()


def _eventually(what: str, check: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (httpx.HTTPError, KeyError, TypeError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(2)


def _doctor(env_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "apiary.cli.main", "doctor", "--env-file", str(env_file)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "300"})


def _now(engine: Engine) -> str:
    """The engine's clock, as `docker inspect` writes StartedAt."""
    return engine.docker("info", "--format", "{{json .SystemTime}}").stdout.strip().strip('"')


def test_two_participants_bundles_train_together_and_keep_their_state(engine: Engine, images: dict[str, str],
                                                                        tmp_path: Path) -> None:
    a = Participant(engine, "a", tmp_path)
    participants = [a]
    try:
        a.project.up()
        a.wait_healthy("dht")
        b = Participant(engine, "b", tmp_path, initial_peers=a.dht_address)
        participants.append(b)
        b.project.up()
        for participant in participants:
            participant.wait_healthy(*SERVICES)

        # they find each other: each dht knows the other; each averager's round had both
        _eventually("the dht services know each other", lambda: all(
            p.admin("dht", "/status")["routing_table_size"] >= 1 for p in participants))
        assert read_env_file(ENV_EXAMPLE)["APIARY_TASK"] == "moe_lm"  # the bundle's default task
        for p in participants:
            assert p.admin("trainer", "/status")["task"] == "moe_lm"
            assert p.admin("expert-server", "/status")["experts"] == SHARE
        _eventually("both expert servers train (each trainer's mixture calls the swarm's experts)", lambda: all(
            p.admin("expert-server", "/status")["updates"] > 0 for p in participants))
        _eventually("the averagers averaged together", lambda: all(
            (p.admin("averager", "/status")["last_round"] or {}).get("group_size") == 2 for p in participants))
        # the loss falls: the first trainer's held-out loss from its untrained start, and the second's, who
        # started from the swarm's state, below that start too
        def loss_fell() -> bool:
            start = a.admin("trainer", "/status")["summary"]["loss_start"]
            return all(p.admin("trainer", "/status")["summary"]["loss_latest"] < 0.7 * start for p in participants)

        _eventually("the loss falls", loss_fell)
        for p in participants:
            assert p.admin("trainer", "/status")["peers"] == 2

        # each trainer calls both participants' expert servers: with the other trainer paused,
        # both servers still serve backward passes
        for paused, running in ((b, a), (a, b)):
            paused.project.compose("pause", "trainer")
            try:
                time.sleep(3)  # calls of the paused trainer already under way end
                before = {p.name: p.backward_passes() for p in participants}
                _eventually(f"{running.name}'s trainer alone trains through both expert servers", lambda: all(
                    p.backward_passes() > before[p.name] for p in participants), timeout=120)
            finally:
                paused.project.compose("unpause", "trainer")

        # a restarted trainer resumes from the newest state: its averager's (handed over at every
        # epoch), newer than or as new as its checkpoint, so not the checkpoint
        _eventually("a trainer checkpoint is saved", lambda: "checkpoint of epoch" in a.logs("trainer"))
        epoch = a.admin("trainer", "/status")["local_epoch"]
        assert epoch is not None, (f"a's trainer has no optimizer: a new process (Docker restarted it "
                                   f"{a.restarts('trainer')} times on its own)\n{a.logs('trainer')[-4000:]}")
        restarted_at = _now(engine)
        a.project.restart("trainer")
        a.wait_healthy("trainer", started_after=restarted_at)

        def log_since_restart() -> str:
            since = engine.docker("logs", "--since", restarted_at, a.project.container("trainer"))
            return since.stdout + since.stderr

        _eventually("the restarted trainer loaded the swarm's state", lambda: LOADED.search(log_since_restart()),
                    timeout=120)
        log = log_since_restart()
        assert int(LOADED.search(log).group(1)) >= epoch, log[-3000:]
        assert "resumed from the checkpoint" not in log, log[-3000:]
        _eventually("the restarted trainer went on from its epoch", lambda: a.admin("trainer", "/status")["local_epoch"] >= epoch,
                    timeout=120)

        # down + up keeps the DHT's records, the experts' checkpoints and the averager's state
        _eventually("b's averager holds a state", lambda: b.admin("averager", "/status")["donor_epoch"] is not None)
        assert b.redis_keys() > 0
        epoch = b.admin("trainer", "/status")["local_epoch"]
        b.project.compose("down", "--timeout", "20")
        b.project.compose("up", "--detach", "--no-build", "redis")
        _eventually("redis answers", lambda: b.redis_keys() >= 0, timeout=60)
        assert b.redis_keys() > 0  # what the AOF on the redis-data volume kept, before any dht writes
        b.project.up()
        b.wait_healthy(*SERVICES)
        assert f"resumed {SHARE} experts from their checkpoints" in b.logs("expert-server")  # the checkpoints volume
        assert "resumed the state of epoch" in b.logs("averager")  # its state file on the same volume
        _eventually("b's trainer went on from the run's epoch", lambda: b.admin("trainer", "/status")["local_epoch"] >= epoch,
                    timeout=120)

        # apiary doctor passes on this host, and names each injected fault
        for p in participants:
            result = _doctor(p.env_file)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "all checks passed" in result.stdout
        with socket.socket() as taken:
            taken.bind(("0.0.0.0", 0))
            taken.listen()
            port = taken.getsockname()[1]
            faulty = tmp_path / "faulty.env"
            faulty.write_text(a.env_file.read_text().replace(f"APIARY_EXPERT_SERVER_PORT={a.settings['APIARY_EXPERT_SERVER_PORT']}",
                                                             f"APIARY_EXPERT_SERVER_PORT={port}")
                              .replace(f"APIARY_ANNOUNCE_HOST={a.host}", "APIARY_ANNOUNCE_HOST=198.51.100.7"))
            result = _doctor(faulty)
        failures = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
        assert result.returncode == len(failures) == 2, result.stdout
        assert f"{port} (APIARY_EXPERT_SERVER_PORT) is taken" in failures[0]
        assert "APIARY_ANNOUNCE_HOST=198.51.100.7 is a documentation address" in failures[1]
    finally:
        with ExitStack() as teardown:  # every participant taken down, even if one's down fails
            for participant in participants:
                teardown.callback(participant.project.down)


_TASK = '''
import torch
from apiary.tasks import Task

def task(seed=0, width=4):
    def batches():
        while True:
            yield torch.randn(8, width)
    return Task(model=torch.nn.Linear(width, 1), batches=batches(), loss=lambda m, x: m(x).pow(2).mean(),
                optimizer=lambda p: torch.optim.SGD(p, lr=0.1), batch_size=8)
'''
_LOAD = "from apiary.tasks import load_task; print(load_task('mytask:task', width=3).model.in_features)"


def test_a_task_from_the_task_path_or_a_derived_image_loads_in_the_trainer(engine: Engine, images: dict[str, str],
                                                                            tmp_path: Path) -> None:
    package = tmp_path / "tasks" / "mytask"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(_TASK)
    tasks = tmp_path / "tasks"
    tasks.chmod(0o755)
    mounted = engine.docker("run", "--rm", "-v", f"{tasks}:/opt/apiary/tasks:ro", "--entrypoint", "python",
                            images["trainer"], "-c", _LOAD)
    assert mounted.stdout.strip() == "3"
    # the derived image of docs/deploy.md: FROM the trainer image, COPY the task
    derived = f"{PREFIX}/derived-trainer:{RUN}"
    (tmp_path / "Dockerfile").write_text(f"FROM {images['trainer']}\nUSER root\nCOPY tasks/mytask/ /opt/apiary/tasks/mytask/\n"
                                         "USER 10001:10001\n")
    try:
        engine.docker("build", "-t", derived, str(tmp_path), timeout=300)
        assert engine.docker("run", "--rm", "--entrypoint", "python", derived, "-c", _LOAD).stdout.strip() == "3"
    finally:
        engine.docker("rmi", "--force", derived, check=False)

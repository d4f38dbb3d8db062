"""One participant's bundle run with the real Compose files, as its operator would run it.

    project = ComposeProject(engine, "apiary-test-a", env_file)   # an .env of its own
    project.up("dht")                                              # and what it depends on
    project.wait_healthy("dht")
    project.down()                                                 # containers, network, volumes
"""

from __future__ import annotations

import json
import random
import socket
import time
from pathlib import Path

from deploy.engine import Engine
from deploy.files import COMPOSE_FILE

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def unused_ports(count: int) -> list[int]:
    """`count` distinct ports that nothing on the host listens on (any address), for a bundle to
    publish. They lie below the kernel's ephemeral range: a port picked there (as binding port 0
    picks) can be taken by any outgoing connection on the host before Compose publishes it, and
    Compose 1.29 then fails `up` with "Host is already in use by another container"."""
    low = int(EPHEMERAL_RANGE.read_text().split()[0]) if EPHEMERAL_RANGE.exists() else 32768
    ports: list[int] = []
    for port in random.sample(range(max(1024, low - 12000), low), k=min(4 * count + 64, low - 1024)):
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise AssertionError(f"fewer than {count} free ports below {low}")


class ComposeProject:
    def __init__(self, engine: Engine, name: str, env_file: Path, files: tuple[Path, ...] = (COMPOSE_FILE,)):
        self.engine = engine
        self.name = name
        self.env_file = env_file
        self.files = files

    def compose(self, *args: str, timeout: float = 240) -> str:
        options = ["--project-name", self.name, "--env-file", str(self.env_file)]
        for path in self.files:
            options += ["--file", str(path)]
        return self.engine.compose(*options, *args, timeout=timeout).stdout

    def up(self, *services: str) -> None:
        self.compose("up", "--detach", "--no-build", *services)

    def container(self, service: str) -> str:
        container = self.compose("ps", "--quiet", service).strip()
        assert container, f"{self.name}: no container for {service}"
        return container

    def inspect(self, service: str) -> dict:
        return json.loads(self.engine.docker("inspect", self.container(service)).stdout)[0]

    def wait_healthy(self, service: str, *, started_after: str = "", timeout: float = 120) -> dict:
        """Waits until the service's container (started after `started_after`, an ISO time) is
        healthy by its own healthcheck; returns its `docker inspect` record."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.inspect(service)["State"]
            health = state.get("Health", {}).get("Status")
            if health == "healthy" and state["StartedAt"] > started_after:
                return state
            if not state["Running"] or time.monotonic() > deadline:
                logs = self.compose("logs", "--no-color", "--tail", "40", service)
                raise AssertionError(f"{self.name}/{service} is {state['Status']}, health {health!r}:\n{logs}")
            time.sleep(1)

    def restart(self, service: str) -> None:
        self.compose("restart", "--timeout", "20", service)

    def stop(self, service: str) -> None:
        self.compose("stop", "--timeout", "20", service)

    def down(self) -> None:
        """Removes the project's containers, networks and volumes."""
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "20")

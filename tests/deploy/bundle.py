"""The services of compose.yaml run as local processes, configured as their containers are.

    with LocalBundle(tmp_path, redis_url) as bundle:
        bundle.start("trainer")          # and, first, what it depends on in compose.yaml
        bundle.get("trainer", "/metrics")

Each service gets the environment its container would get (the image's ENV, then the
`environment` of compose.yaml filled in from .env.example) with the container-only parts
mapped to this host: every port to a free one, `<service>:<port>` addresses of the bundle to
127.0.0.1 and that port, `redis://redis:6379` to the test's Redis, paths under
/var/lib/apiary to a temporary directory, a secret's /run/secrets path to its file (the
identities of ./secrets made in the temporary directory by deploy/identities.sh, as .env.example
says). Nothing else is added: a setting the container would lack is lacking here too. Processes still running on exit are killed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import httpx
from service_processes import free_port

from deploy.files import COMPOSE_FILE, ENV_EXAMPLE, REPO, image_definition, load_compose, make_identities, read_env_file

APIARY = [sys.executable, "-m", "apiary.cli.main"]
HOST_SETTINGS = ("APIARY_HOST", "APIARY_LOCAL_HOST", "APIARY_ADMIN_HOST", "APIARY_ANNOUNCE_HOST")
CONTAINER_DATA = "/var/lib/apiary"
SECRETS = "/run/secrets/"
HOST_SECRETS = "./secrets/"  # the identity files' folder in .env.example
START_TIMEOUT_S = 120.0


class LocalBundle:
    def __init__(self, directory: Path, redis_url: str):
        self.directory = directory
        self.redis_url = redis_url
        # the first participant of a run: its dht starts a new swarm
        doc = load_compose(COMPOSE_FILE, env={**read_env_file(ENV_EXAMPLE), "APIARY_NEW_SWARM": "true"})[0]
        self.compose, self.secrets = doc["services"], doc.get("secrets", {})
        self.ports: dict[tuple[str, str], int] = {}  # (service, port in its container) -> port here
        self.processes: dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}
        make_identities(directory / HOST_SECRETS)

    def environment(self, service: str) -> dict[str, str]:
        """The service's container environment, mapped to this host."""
        image_env = image_definition(service).env
        settings = {k: v for k, v in image_env.items() if k.startswith("APIARY_")}
        settings.update({k: str(v) for k, v in (self.compose[service].get("environment") or {}).items()})
        for key, value in settings.items():
            if key in HOST_SETTINGS:
                settings[key] = "127.0.0.1"
            elif key.endswith("_PORT") and value.isdigit():
                settings[key] = str(self.ports.setdefault((service, value), free_port()))
            elif value.startswith(CONTAINER_DATA):  # its folder exists in the image, so here too
                settings[key] = str(self.directory / service) + value[len(CONTAINER_DATA):]
                Path(settings[key]).parent.mkdir(parents=True, exist_ok=True)
            elif value.startswith(SECRETS):  # the file Compose mounts there
                [source] = [entry["source"] for entry in self.compose[service].get("secrets", [])
                            if entry["target"] == value[len(SECRETS):]]
                file = self.secrets[source]["file"]
                settings[key] = str(self.directory / file if file.startswith(HOST_SECRETS) else REPO / file)
            elif value.startswith("redis://redis:6379"):
                settings[key] = self.redis_url
            elif match := re.fullmatch(r"([a-z-]+):(\d+)", value):
                settings[key] = f"127.0.0.1:{self.ports[(match.group(1), match.group(2))]}"
        return settings

    def start(self, service: str) -> None:
        """Starts the service after what it depends on; returns once it is healthy."""
        if service in self.processes:
            return
        for dependency in self.compose[service].get("depends_on") or {}:
            if dependency != "redis":  # the test's Redis stands in for the bundle's
                self.start(dependency)
        settings = self.environment(service)
        log = tempfile.TemporaryFile()
        process = subprocess.Popen([*APIARY, service], env={**os.environ, **settings, "COLUMNS": "400"},
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.processes[service] = (process, log)
        self._wait_until_healthy(service)

    def _wait_until_healthy(self, service: str) -> None:
        """Waits until the route of the service's Compose healthcheck answers 200."""
        process, _ = self.processes[service]
        route = self.compose[service]["healthcheck"]["test"][-1]
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise AssertionError(f"apiary {service} exited with {process.returncode}: {self.output(service)}")
            try:
                if self.get(service, route).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"apiary {service} not healthy in {START_TIMEOUT_S:.0f} s: {self.output(service)}")
            time.sleep(0.25)

    def get(self, service: str, path: str) -> httpx.Response:
        port = self.environment(service)["APIARY_ADMIN_PORT"]
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)

    def output(self, service: str) -> str:
        _, log = self.processes[service]
        log.seek(0)
        return log.read().decode(errors="replace")[-4000:]

    def close(self) -> None:
        for process, log in reversed(self.processes.values()):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
            log.close()

    def __enter__(self) -> LocalBundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

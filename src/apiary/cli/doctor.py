"""`apiary doctor`: checks this host for the Compose bundle, one line per check with its verdict
and, when it fails, the fix; the exit code is the number of failed checks.

It reads the bundle's `.env` (as Compose does: the defaults of compose.yaml for what is unset)
and asks the Docker engine through the Docker SDK for Python (`pip install 'apiary[deploy]'`):
the engine answers; the NVIDIA runtime and the GPUs `.env` names exist; the driver suits the
CUDA images; the ports are free (or published by this bundle); the announced host is one peers
can dial (against the address peers observe, and the running dht's reachability verdict);
the clock agrees with the peers'; each service's identity file (its Compose secret) is a key
the containers' user can read; the access tokens are valid; the images are built, of this
checkout's version.
"""

from __future__ import annotations

import asyncio
import errno
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx

import apiary
from apiary.cli.options import option
from apiary.wire import (
    PROBE, ChannelPool, Identity, IdentityError, PeerAddress, RpcClient, WireSettings, parse_peer_list,
)
from apiary.wire.auth import CLOCK_SKEW_SECONDS, CredentialsError, read_token
from apiary.wire.observed import PUBLIC, host_scope
from apiary.wire.protos.wire_pb2 import PingRequest

# compose.yaml's defaults, for what `.env` leaves unset
DEFAULTS = {
    "APIARY_DHT_PORT": "31337", "APIARY_RELAY_PORT": "31341", "APIARY_AVERAGER_PORT": "31338",
    "APIARY_AVERAGER_BULK_PORT": "31339", "APIARY_EXPERT_SERVER_PORT": "31340", "APIARY_RELAY": "true",
    "APIARY_DHT_ADMIN_PORT": "9101", "APIARY_AVERAGER_ADMIN_PORT": "9102", "APIARY_EXPERT_SERVER_ADMIN_PORT": "9103",
    "APIARY_TRAINER_ADMIN_PORT": "9104", "APIARY_DEVICE": "cpu", "APIARY_TRAINER_GPUS": "0",
    "APIARY_EXPERT_SERVER_GPUS": "1", "APIARY_IMAGE_PREFIX": "apiary", "APIARY_IMAGE_TAG": apiary.__version__,
    "APIARY_TLS": "true",
}
PUBLIC_PORTS = ("APIARY_DHT_PORT", "APIARY_RELAY_PORT", "APIARY_AVERAGER_PORT", "APIARY_AVERAGER_BULK_PORT",
                "APIARY_EXPERT_SERVER_PORT")
ADMIN_PORTS = ("APIARY_DHT_ADMIN_PORT", "APIARY_AVERAGER_ADMIN_PORT", "APIARY_EXPERT_SERVER_ADMIN_PORT",
               "APIARY_TRAINER_ADMIN_PORT")
SERVICES = ("dht", "averager", "expert-server", "trainer")
DEFAULTS.update({f"APIARY_{name.upper().replace('-', '_')}_IDENTITY_FILE": f"./secrets/{name}.key" for name in SERVICES})
VARIANT_SERVICES = ("expert-server", "trainer")
MIN_DRIVER = 525  # torch's CUDA 12 wheels run on R525 and newer (CUDA minor-version compatibility)
TOKEN_MARGIN_S = 3 * 86400  # a token expiring sooner than this fails: time to ask for a new one
PEER_TIMEOUT_S = 5.0
UNDIALLABLE = ("loopback", "link-local", "documentation")  # host scopes no other machine dials


@dataclass
class Verdict:
    check: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{'PASS' if self.ok else 'FAIL'}  {self.check:<9} {self.detail}"
        return text if self.ok else f"{text}  -- fix: {self.fix}"


def read_env(path: Path) -> dict[str, str]:
    """`.env` as Compose reads it (KEY=VALUE lines), over compose.yaml's defaults."""
    values = dict(DEFAULTS)
    if path.exists():
        for line in path.read_text().splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and not key.startswith("#") and value.strip():
                values[key.strip()] = value.strip()
    return values


class Doctor:
    """The checks, in order; `docker`: a Docker SDK client, or None where the engine does not answer."""

    def __init__(self, env: dict[str, str], env_dir: Path, docker: Any | None, gpu: bool):
        self.env = env
        self.env_dir = env_dir
        self.docker = docker
        self.gpu = gpu or env["APIARY_DEVICE"] == "cuda"
        self.peers: list[tuple[float, str, str]] | None = None  # (clock offset, observed host, peer) per peer

    def run(self) -> Iterator[Verdict]:
        for check in (self.engine, self.gpus, self.driver, self.ports, self.announce, self.clock, self.identities,
                      self.tokens, self.images):
            yield from check()

    # ---- the engine and GPUs

    def engine(self) -> Iterator[Verdict]:
        if self.docker is None:
            yield Verdict("engine", False, "no Docker engine answers",
                          "start it (systemctl start docker) or point DOCKER_HOST at it; install the SDK with "
                          "pip install 'apiary[deploy]'")
            return
        yield Verdict("engine", True, f"Docker {self.docker.version().get('Version', '?')} answers")

    def gpus(self) -> Iterator[Verdict]:
        if not self.gpu:
            yield Verdict("gpus", True, "none asked for (APIARY_DEVICE=cpu, no compose.gpu.yaml)")
            return
        runtimes = set((self.docker.info().get("Runtimes") or {}) if self.docker is not None else ())
        if "nvidia" not in runtimes:
            yield Verdict("gpus", False, f"the engine has no nvidia runtime (runtimes: {', '.join(sorted(runtimes)) or 'none'})",
                          "install the NVIDIA Container Toolkit and run nvidia-ctk runtime configure --runtime=docker")
            return
        count = len(_nvidia_smi("-L"))
        asked = {name: self.env[f"APIARY_{name.upper().replace('-', '_')}_GPUS"] for name in VARIANT_SERVICES}
        for name, ids in asked.items():
            missing = [i for i in ids.split(",") if not i.strip().isdigit() or int(i) >= count]
            if missing:
                yield Verdict("gpus", False, f"the {name} is given GPU {', '.join(missing)} but this host has {count}",
                              f"set APIARY_{name.upper().replace('-', '_')}_GPUS to ids among 0..{count - 1} in .env"
                              + (" (0 for both to share the only GPU)" if count == 1 else ""))
                return
        shared = set(asked["trainer"].split(",")) & set(asked["expert-server"].split(","))
        yield Verdict("gpus", True, f"{count} GPUs; trainer {asked['trainer']}, expert server {asked['expert-server']}"
                      + (f" (sharing {', '.join(sorted(shared))}, as asked)" if shared else ""))

    def driver(self) -> Iterator[Verdict]:
        if not self.gpu:
            return
        versions = _nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader")
        if not versions:
            yield Verdict("driver", False, "nvidia-smi does not answer", "install the NVIDIA driver (R525 or newer)")
            return
        major = int(versions[0].split(".")[0])
        yield Verdict("driver", major >= MIN_DRIVER, f"NVIDIA driver {versions[0]}; the CUDA images need R{MIN_DRIVER}+",
                      f"upgrade the driver to R{MIN_DRIVER} or newer")

    # ---- the network

    def ports(self) -> Iterator[Verdict]:
        published = self._published_ports()
        for setting in (*PUBLIC_PORTS, *ADMIN_PORTS):
            if setting == "APIARY_RELAY_PORT" and self.env["APIARY_RELAY"] != "true":
                continue
            port = int(self.env[setting])
            host = "0.0.0.0" if setting in PUBLIC_PORTS else "127.0.0.1"
            if port in published:
                yield Verdict("ports", True, f"{port} ({setting}) is published by {published[port]}")
            elif _free(host, port):
                yield Verdict("ports", True, f"{port} ({setting}) is free on {host}")
            else:
                yield Verdict("ports", False, f"{port} ({setting}) is taken by another program on {host}",
                              f"stop that program (ss -ltnp 'sport = :{port}') or set another {setting} in .env")

    def _published_ports(self) -> dict[int, str]:
        found: dict[int, str] = {}
        for container in self.docker.containers.list() if self.docker is not None else ():
            for bindings in (container.ports or {}).values():
                for binding in bindings or ():
                    found[int(binding["HostPort"])] = f"container {container.name}"
        return found

    def announce(self) -> Iterator[Verdict]:
        host = self.env.get("APIARY_ANNOUNCE_HOST", "")
        observed = sorted({seen for _, seen, _ in self._ping_peers() if seen})
        scope = host_scope(host) if host else ""
        seen = f" (peers see {', '.join(observed)})" if observed else ""
        if scope in UNDIALLABLE:
            yield Verdict("announce", False, f"APIARY_ANNOUNCE_HOST={host} is a {scope} address: peers cannot dial it"
                          + seen, "set this host's public address or leave it empty")
        elif host and observed and host not in observed and any(
                host_scope(o) == PUBLIC or host_scope(o) != scope for o in observed):
            yield Verdict("announce", False, f"APIARY_ANNOUNCE_HOST={host} but peers see this host at "
                          f"{', '.join(observed)}", f"set APIARY_ANNOUNCE_HOST={observed[0]} or leave it empty")
        elif host:
            note = "" if scope in (PUBLIC, "name") else f" (a {scope} address: only peers on this network dial it)"
            yield Verdict("announce", True, f"APIARY_ANNOUNCE_HOST={host}{note}{seen}")
        else:
            yield Verdict("announce", True, f"empty: the services announce what peers observe{seen}")
        yield from self._reachability()

    def _reachability(self) -> Iterator[Verdict]:
        """The running dht's own verdict (apiary.services.reachability), when the bundle is up."""
        try:
            status = httpx.get(f"http://127.0.0.1:{self.env['APIARY_DHT_ADMIN_PORT']}/status", timeout=3).json()
        except (httpx.HTTPError, ValueError):
            return  # not running: nothing more to check
        reach = status.get("reachability") or {}
        if reach.get("announce_problem"):
            yield Verdict("reachable", False, f"the dht reports: {reach['announce_problem']}",
                          "set APIARY_ANNOUNCE_HOST as it says, then docker compose up -d")
        elif reach.get("state") in ("behind_nat", "client"):
            yield Verdict("reachable", False, f"peers cannot dial the dht at {status.get('address')} "
                          f"({reach['state']}: {reach.get('detail', '')})",
                          f"forward the public ports ({', '.join(PUBLIC_PORTS)}) to this host, or let it use relays "
                          "(APIARY_REACHABILITY=auto with a relay in the swarm)")
        else:
            yield Verdict("reachable", True, f"the dht is {reach.get('state', 'running')} at {status.get('address')}")

    def clock(self) -> Iterator[Verdict]:
        answers = self._ping_peers()
        if not answers:
            yield Verdict("clock", True, "no initial peer to compare with (APIARY_INITIAL_PEERS empty or silent)")
            return
        offset, _, peer = max(answers, key=lambda answer: abs(answer[0]))
        limit = CLOCK_SKEW_SECONDS / 2
        yield Verdict("clock", abs(offset) < limit, f"{offset:+.1f} s from {peer}, the farthest of {len(answers)} "
                      f"peers (at most ±{limit:g} s)", "synchronise the clock (timedatectl set-ntp true)")

    def _ping_peers(self) -> list[tuple[float, str, str]]:
        if self.peers is None:
            peers = parse_peer_list(self.env.get("APIARY_INITIAL_PEERS", ""))
            self.peers = asyncio.run(_ping_all(peers, self.env["APIARY_TLS"] == "true")) if peers else []
        return self.peers

    # ---- credentials and images

    def identities(self) -> Iterator[Verdict]:
        for service in SERVICES:
            setting = f"APIARY_{service.upper().replace('-', '_')}_IDENTITY_FILE"
            path = self.env_dir / self.env[setting]
            try:
                peer_id = Identity.load(path).peer_id
            except (IdentityError, OSError) as e:
                yield Verdict("identity", False, f"{setting}: {e}", "sh deploy/identities.sh (it makes the missing keys)")
                continue
            readable = path.stat().st_mode & 0o004
            yield Verdict("identity", bool(readable), f"the {service} is peer {peer_id}"
                          + ("" if readable else f", but {path} is not readable by the containers' user"),
                          f"chmod 644 {path} (keep its folder private: chmod 700)")

    def tokens(self) -> Iterator[Verdict]:
        if not self.env.get("APIARY_RUN_AUTHORITY"):
            yield Verdict("tokens", True, "an open run: no access tokens")
            return
        for service in SERVICES:
            setting = f"APIARY_{service.upper().replace('-', '_')}_TOKEN_FILE"
            path = self.env.get(setting, "")
            if not path:
                yield Verdict("tokens", False, f"a private run, but {setting} is empty",
                              f"put the {service}'s token file in .env (docs/deploy.md, Private runs)")
                continue
            try:
                token = read_token(str(self.env_dir / path))
            except CredentialsError as e:
                yield Verdict("tokens", False, f"{setting}: {e}", "ask the run's organiser for the token file again")
                continue
            left = token.expires_at - time.time()
            yield Verdict("tokens", left > TOKEN_MARGIN_S,
                          f"the {service}'s token is valid until {time.strftime('%Y-%m-%d %H:%M', time.gmtime(token.expires_at))} UTC",
                          "ask the organiser for a new token, replace the file and docker compose up -d --force-recreate")

    def images(self) -> Iterator[Verdict]:
        tag = self.env["APIARY_IMAGE_TAG"]
        if tag != apiary.__version__:
            yield Verdict("images", False, f"APIARY_IMAGE_TAG={tag}, but this checkout is version {apiary.__version__}",
                          f"set APIARY_IMAGE_TAG={apiary.__version__} in .env")
            return
        device = "cuda" if self.gpu else "cpu"
        for service in SERVICES:
            name = f"{self.env['APIARY_IMAGE_PREFIX']}/{service}:{tag}" + (f"-{device}" if service in VARIANT_SERVICES else "")
            present = self.docker is not None and _has_image(self.docker, name)
            yield Verdict("images", present, f"{name} {'is built' if present else 'is missing'}",
                          "docker compose build (or make images)")


async def _ping_all(peers: list[PeerAddress], tls: bool) -> list[tuple[float, str, str]]:
    async with ChannelPool(WireSettings(tls=tls)) as pool:
        answers = await asyncio.gather(*(_ping(pool, peer) for peer in peers))
    return [answer for answer in answers if answer is not None]


async def _ping(pool: ChannelPool, peer: PeerAddress) -> tuple[float, str, str] | None:
    """(the peer's clock minus ours, the host it sees us at, the peer), or None if it does not answer."""
    started = time.time()
    try:
        reply = await RpcClient(pool, PROBE, peer.endpoint, timeout=PEER_TIMEOUT_S, peer_id=peer.peer_id).call(
            "Ping", PingRequest())
    except Exception:  # noqa: BLE001 - a silent peer is left out; the check says how many answered
        return None
    ended = time.time()
    observed = reply.observed_address.rsplit(":", 1)[0].strip("[]") if reply.observed_address else ""
    return reply.server_time - (started + ended) / 2, observed, str(peer.endpoint)


def _nvidia_smi(*args: str) -> list[str]:
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return []
    result = subprocess.run([tool, *args], capture_output=True, text=True, timeout=30, check=False)
    return [line.strip() for line in result.stdout.splitlines() if line.strip()] if result.returncode == 0 else []


def _free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as e:
            return e.errno != errno.EADDRINUSE
    return True


def _has_image(client: Any, name: str) -> bool:
    import docker.errors

    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def docker_client() -> Any | None:
    """A Docker SDK client of the engine DOCKER_HOST (or the default socket) names; None where
    the SDK is missing or the engine does not answer."""
    try:
        import docker
    except ImportError:
        return None
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception:  # noqa: BLE001 - any failure to reach the engine is the same verdict
        return None
    return client


def doctor_command(
    env_file: Annotated[Path, option("--env-file", "the bundle's .env")] = Path(".env"),
    gpu: Annotated[bool, option("--gpu/--no-gpu", "the bundle runs with compose.gpu.yaml (default: when "
                                "APIARY_DEVICE=cuda)")] = False,
) -> None:
    """Check this host for the Compose bundle: one line per check, the fix for each failure; the exit code counts the failures."""
    doctor = Doctor(read_env(env_file), env_file.resolve().parent, docker_client(), gpu)
    failures = 0
    for verdict in doctor.run():
        print(verdict.line(), flush=True)
        failures += not verdict.ok
    print(f"{failures} of the checks failed" if failures else "all checks passed", flush=True)
    sys.exit(min(failures, 125))

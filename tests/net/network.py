"""The internet on one machine: hosts in network namespaces on one switch, with shaped links.

    with Network([Link(rate_mbit=100, rtt_ms=50)] * 6) as net:
        a, b = net.hosts[:2]
        dht = a.apiary("dht", "--new-swarm", "--port", "31337")
        dht.wait_for(r"local API: (\\S+)")
        net.partition(net.hosts[:3], net.hosts[3:])   # two halves that cannot reach each other
        net.heal()

Layout (nothing of it in the machine's own namespace):
- a switch namespace `<prefix>-sw` holding the bridge `br0`;
- one namespace per host, `<prefix>-h<i>`, whose `eth0` has 198.18.0.<i+1>/24 (the RFC 2544
  benchmarking range: it exists only inside these namespaces) and whose loopback is up;
- each host's link: a veth pair `eth0` <-> `h<i>` on the bridge, or, where the link has latency,
  jitter, loss or dial-out-only filtering, two TAPs joined by a relay process (`net.relay`);
- rates: `tbf` on both ends of the link (egress of `eth0` = the host's upload, egress of `h<i>`
  = its download);
- a host behind a real NAT (`Link(nat="cone" | "symmetric")`) has a private address behind a
  router namespace `<prefix>-r<i>` that holds the public address and the shaped link;
  `nat="firewall"` keeps the public address and drops unsolicited inbound packets (`net.nat`).

Partitions move bridge ports: each group of `partition()` gets a bridge of its own, so frames
between groups have no path (connections stall, as across a real partition); `heal()` puts
every port back on `br0`.

Cleanup (`close()`, also when the test fails): every process started on a host, then whatever
else still runs in the namespaces (`ip netns pids`), then the namespaces, which takes their
devices and qdiscs with them. A previous run that crashed left namespaces named with a
process id that is no longer alive: they are removed the same way when a Network starts.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from apiary.wire import Endpoint
from net import nat
from net.forward import Forwarder
from net.netns import NETNS_DIR
from net.processes import HostProcess

PREFIX = "apnet"
SUBNET = "198.18.0"
TESTS = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS.parent
_networks = itertools.count()
_NAME = re.compile(rf"^{PREFIX}-(\d+)-\d+-")


@dataclass(frozen=True)
class Link:
    """One host's access link; every setting applies to each direction separately."""

    rate_mbit: float | None = None  # tbf rate (None: as fast as the machine goes)
    rtt_ms: float = 0.0  # round-trip time the link adds: each frame is held rtt/2 each way
    jitter_ms: float = 0.0  # ± uniform, each way (frames keep their order)
    loss: float = 0.0  # fraction of frames dropped, each way
    dial_out_only: bool = False  # behind a NAT: only answers to flows the host opened come in
    nat: str | None = None  # a real NAT: "cone", "symmetric" or "firewall" (see net.nat)

    def __post_init__(self) -> None:
        if self.rate_mbit is not None and self.rate_mbit <= 0:
            raise ValueError(f"rate_mbit must be positive, not {self.rate_mbit}")
        if self.rtt_ms < 0 or self.jitter_ms < 0:
            raise ValueError("rtt_ms and jitter_ms must not be negative")
        if self.jitter_ms > self.rtt_ms / 2:
            raise ValueError(f"jitter_ms {self.jitter_ms} is above the one-way delay rtt_ms/2 = {self.rtt_ms / 2}")
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss must be in [0, 1), not {self.loss}")
        if self.nat is not None and self.nat not in nat.KINDS:
            raise ValueError(f"nat must be one of {nat.KINDS}, not {self.nat!r}")
        if self.nat is not None and self.dial_out_only:
            raise ValueError("dial_out_only is the user-space stand-in for a NAT: not both")

    @property
    def needs_relay(self) -> bool:
        return bool(self.rtt_ms or self.jitter_ms or self.loss or self.dial_out_only)


def skip_reason() -> str | None:
    """Why network tests cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "network tests need root (network namespaces, veth, TAP, tc); CI runs them as root"
    missing = [tool for tool in ("ip", "tc", "setpriv") if shutil.which(tool) is None]
    if missing:
        return f"network tests need {', '.join(missing)} (iproute2, util-linux)"
    if not os.path.exists("/dev/net/tun"):
        return "network tests need /dev/net/tun (TAP devices for the latency relay)"
    return None


def nat_skip_reason() -> str | None:
    """Why tests with real NATs cannot run here (None: they can); installs iptables if missing."""
    return skip_reason() or nat.iptables_missing()


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs `ip`/`tc` and friends; a failure raises with the command and its stderr."""
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def namespaces() -> list[str]:
    return sorted(name for name in os.listdir(NETNS_DIR) if name.startswith(f"{PREFIX}-")) \
        if os.path.isdir(NETNS_DIR) else []


def _pids(namespace: str) -> list[int]:
    result = run("ip", "netns", "pids", namespace, check=False)
    return [int(pid) for pid in result.stdout.split()]


def remove_namespace(namespace: str) -> None:
    """Kills every process inside `namespace`, then deletes it (its devices go with it)."""
    for _ in range(50):
        pids = _pids(namespace)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    run("ip", "netns", "delete", namespace, check=False)


def _owner_alive(namespace: str) -> bool:
    match = _NAME.match(namespace)
    if match is None:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Removes the namespaces of runs whose process is gone (a crashed run); returns them."""
    stale = [name for name in namespaces() if not _owner_alive(name)]
    for name in stale:
        remove_namespace(name)
    return stale


def _tbf(namespace: str, device: str, rate_mbit: float) -> None:
    rate = rate_mbit * 1e6 / 8  # bytes per second
    burst = max(96 * 1024, int(rate * 0.01))  # whole 64 KiB offload segments pass; 10 ms at line rate
    limit = max(4 * burst, int(rate * 0.1))  # the link's buffer: 100 ms at line rate
    run("tc", "-n", namespace, "qdisc", "replace", "dev", device, "root", "tbf",
        "rate", f"{int(rate_mbit * 1e6)}bit", "burst", str(burst), "limit", str(limit))


def host_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of processes on the hosts: our package and test helpers importable, no
    proxies (the test addresses are only reachable directly), unbuffered output."""
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    own = os.pathsep.join([str(REPO_ROOT / "src"), str(TESTS)])
    env["PYTHONPATH"] = f"{own}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else own
    env.update({"PYTHONUNBUFFERED": "1", "COLUMNS": "400"})
    env.update(extra or {})
    return env


class Host:
    """One participant's machine: a namespace with an address and a shaped link. Behind a NAT
    with a router, `address` is the private one the host binds, `public_address` the router's
    (what others see and dial); elsewhere both are the same."""

    def __init__(self, network: Network, index: int, link: Link):
        self.network = network
        self.index = index
        self.name = f"h{index}"
        self.namespace = f"{network.prefix}-{self.name}"
        self.public_address = f"{SUBNET}.{index + 1}"
        self.router: str | None = None  # the router's namespace, which holds the switch link
        self.address = self.public_address
        if link.nat in nat.ROUTED:
            self.router = f"{network.prefix}-r{index}"
            self.address = f"{nat.private_subnet(index)}.2"
        self.link = link
        self.relay: HostProcess | None = None
        self.processes: list[HostProcess] = []
        self._forwarders: list[Forwarder] = []

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.address}, {self.link})"

    @property
    def edge(self) -> str:
        """The namespace whose `eth0` is the link to the switch (the router's, behind a NAT)."""
        return self.router or self.namespace

    def start(self, argv: list[str], *, env: dict[str, str] | None = None, name: str | None = None,
              stdin: bool = False) -> HostProcess:
        """Starts `argv` on this host (cwd: the repository root); killed at the latest on close."""
        process = HostProcess(self.namespace, argv, host_env(env), name or f"{self.name}: {' '.join(argv[:4])}",
                              stdin=stdin)
        self.processes.append(process)
        return process

    def apiary(self, command: str, *args: str, env: dict[str, str] | None = None) -> HostProcess:
        """`apiary <command> --host <this host's address> ...args` on this host."""
        return self.start([sys.executable, "-m", "apiary.cli.main", command, "--host", self.address, *args],
                          env=env, name=f"{self.name}: apiary {command}")

    def python(self, *args: str, env: dict[str, str] | None = None, stdin: bool = False,
               name: str | None = None) -> HostProcess:
        """`python <args>` on this host (e.g. `"-m", "net.tools", "sink"` or a worker script)."""
        return self.start([sys.executable, *args], env=env, stdin=stdin, name=name or f"{self.name}: python {args[:2]}")

    def shape(self, rate_mbit: float | None) -> None:
        """Changes this host's rate limit (both directions) while it runs; None: no limit."""
        for namespace, device in ((self.edge, "eth0"), (self.network.switch, self.name)):
            if rate_mbit is None:
                run("tc", "-n", namespace, "qdisc", "delete", "dev", device, "root", check=False)
            else:
                _tbf(namespace, device, rate_mbit)

    def flows(self) -> list[nat.Flow]:
        """The TCP connections this host's NAT router translates (its conntrack table)."""
        if self.router is None:
            raise ValueError(f"{self.name} is not behind a NAT router")
        return nat.flows(self.router)

    def forward(self, endpoint: Endpoint | int) -> Endpoint:
        """An endpoint of the test process that reaches `endpoint` (or 127.0.0.1:port) inside
        this host, for clients in the test (DHTClient, httpx on the admin port)."""
        target = endpoint if isinstance(endpoint, Endpoint) else Endpoint("127.0.0.1", endpoint)
        forwarder = Forwarder(self.namespace, target)
        self._forwarders.append(forwarder)
        return forwarder.local

    def close(self) -> None:
        for forwarder in self._forwarders:
            forwarder.close()
        for process in self.processes:
            process.close()
        if self.relay is not None:
            self.relay.close()


class Network:
    """`links[i]` is host i's link; a context manager that removes everything on exit."""

    def __init__(self, links: list[Link] | int, *, ready_timeout: float = 20.0):
        self.prefix = f"{PREFIX}-{os.getpid()}-{next(_networks)}"
        self.switch = f"{self.prefix}-sw"
        self.ready_timeout = ready_timeout
        links = [Link()] * links if isinstance(links, int) else list(links)
        if not 1 <= len(links) <= 250:
            raise ValueError(f"a network has 1..250 hosts, not {len(links)}")
        self.hosts = [Host(self, index, link) for index, link in enumerate(links)]
        self._bridges = ["br0"]

    def __enter__(self) -> Self:
        reason = nat_skip_reason() if any(host.link.nat for host in self.hosts) else skip_reason()
        if reason:
            raise RuntimeError(reason)
        remove_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def namespaces(self) -> list[str]:
        return [self.switch, *(host.namespace for host in self.hosts), *(h.router for h in self.hosts if h.router)]

    def _build(self) -> None:
        for namespace in self.namespaces:
            run("ip", "netns", "add", namespace)
            # IPv4 only: no IPv6 link-local chatter on the links the tests measure
            run("ip", "netns", "exec", namespace, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1")
            run("ip", "-n", namespace, "link", "set", "lo", "up")
        run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for host in self.hosts:
            if host.link.needs_relay:
                self._start_relay(host)
            else:
                run("ip", "-n", self.switch, "link", "add", host.name, "type", "veth",
                    "peer", "name", "eth0", "netns", host.edge)
        for host in self.hosts:
            run("ip", "-n", host.edge, "addr", "add", f"{host.public_address}/24", "dev", "eth0")
            run("ip", "-n", host.edge, "link", "set", "eth0", "up")
            run("ip", "-n", self.switch, "link", "set", host.name, "master", "br0", "up")
            if host.link.rate_mbit is not None:
                host.shape(host.link.rate_mbit)
            if host.router is not None:
                for command in nat.router_commands(host.router, host.namespace, host.index):
                    run(*command)
                nat.restore(host.router, nat.router_rules(str(host.link.nat), host.index))
            elif host.link.nat == "firewall":
                nat.restore(host.namespace, nat.FIREWALL_RULES)

    def _start_relay(self, host: Host) -> None:
        link = host.link
        argv = [sys.executable, "-m", "net.relay", "--switch-netns", self.switch,
                "--switch-device", host.name, "--delay-ms", str(link.rtt_ms / 2), "--jitter-ms", str(link.jitter_ms),
                "--loss", str(link.loss), "--seed", str(host.index)]
        if link.dial_out_only:
            argv.append("--dial-out-only")
        host.relay = HostProcess(host.edge, argv, host_env(), f"relay of {host.name}")
        host.relay.wait_for(r"^ready", self.ready_timeout)

    # ---- partitions ----

    def partition(self, *groups: list[Host]) -> None:
        """Each group gets a switch of its own; hosts in no group stay on the main one. Hosts in
        different groups cannot reach each other until `heal()`."""
        seen: set[int] = set()
        for group in groups:
            for host in group:
                if host.index in seen:
                    raise ValueError(f"{host.name} is in two groups")
                seen.add(host.index)
        self.heal()
        for number, group in enumerate(groups, start=1):
            bridge = f"br{number}"
            run("ip", "-n", self.switch, "link", "add", bridge, "type", "bridge")
            run("ip", "-n", self.switch, "link", "set", bridge, "up")
            self._bridges.append(bridge)
            for host in group:
                run("ip", "-n", self.switch, "link", "set", host.name, "master", bridge)

    def cut(self, host: Host) -> None:
        """Isolates one host (its link is down; it keeps its address and processes)."""
        self.partition([host])

    def heal(self) -> None:
        """Every host back on the main switch."""
        if len(self._bridges) == 1:
            return
        for host in self.hosts:
            run("ip", "-n", self.switch, "link", "set", host.name, "master", "br0")
        for bridge in self._bridges[1:]:
            run("ip", "-n", self.switch, "link", "delete", bridge)
        self._bridges = ["br0"]

    # ---- cleanup ----

    def close(self) -> None:
        """Stops every process, then removes the namespaces (with their links and qdiscs)."""
        for host in self.hosts:
            host.close()
        for namespace in self.namespaces:
            if os.path.exists(os.path.join(NETNS_DIR, namespace)):
                remove_namespace(namespace)

    def leftovers(self) -> list[str]:
        """What of this network still exists: namespaces, and processes started on its hosts."""
        left = [f"namespace {name}" for name in namespaces() if name.startswith(f"{self.prefix}-")]
        for host in self.hosts:
            for process in [*host.processes, *([host.relay] if host.relay else [])]:
                if process.alive:
                    left.append(f"process {process.pid} ({process.name})")
        return left

"""Peers behind real NATs are full peers: real processes of the real CLI in network namespaces.

Seven hosts (`tests/net`, NATs of `net.nat`): h0, h1 and h2 public (h0 and h1 run their dht
with `--relay`), h3 behind a cone NAT and h4 behind a symmetric one (the two participants), h5
behind a firewall that drops inbound SYNs, h6 behind another cone NAT. h0..h5 run `apiary dht`
with `--reachability auto`.
What the issue asks for, one test each, sharing the swarm:
- (a) the verdicts: the public nodes are `public`, the NATed and firewalled ones are found
  behind a NAT, see the router's address as their observed one and announce relayed addresses;
- (i) a node configured with a wrong announce host says so, naming the host peers observe;
- (d) records stored through the NATed dht nodes are found by every node, and the public nodes
  keep the NATed ones in their routing tables at their relayed addresses;
- (g) a tensor of known bytes sent through a relay (TLS end to end) is not to be found in what
  the relay's host sends and receives, while the same bytes sent in the clear are;
- (c) four averagers, two of them (h3, h4) behind the NATs, all in node mode, end a round with
  the exact weighted mean;
- (b) a trainer behind the symmetric NAT trains through the expert server behind the cone NAT,
  every step through the relays (no direct connection in its router's conntrack table);
- (h) a trainer behind the other cone NAT (h6) moves to a direct connection to that server
  (hole punching): most of its bytes go over a connection between the two routers;
- (e) the relay the expert server's primary reservation is at is SIGKILLed mid-training: its
  reservations move to the other relay and training goes on.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import torch
from net.experts import SERVED, start_expert_server, wait_until_declared
from net.network import Host, Link, Network, nat_skip_reason, skip_reason
from net.processes import HostProcess

from apiary.averaging.api.client import AveragerClient
from apiary.dht.api import DHTClient
from apiary.wire import ChannelPool, Endpoint, PeerAddress

pytestmark = [pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""), pytest.mark.timeout(240)]

LINKS = [Link(), Link(), Link(), Link(nat="cone"), Link(nat="symmetric"), Link(nat="firewall"), Link(nat="cone")]
DHT_PORT, RELAY_PORT, AVERAGER_PORT, BULK_PORT = "7000", "7300", "7100", "7101"
CHECKS = ("--reachability-period", "5")  # a forming swarm is re-checked this often
ADMIN = r"admin: http://127\.0\.0\.1:(\d+)"
ROUND_OPTIONS = ("--run-id", "nat-e2e", "--target-group-size", "4", "--min-group-size", "4", "--expected-peers", "4",
                 "--gather-seconds", "2", "--join-seconds", "5", "--round-timeout", "60", "--sender-timeout", "20",
                 "--port", AVERAGER_PORT, "--bulk-port", BULK_PORT, "--mode", "node", *CHECKS)
SHAPES = [(256, 32), (77,)]
WEIGHTS = [1.0, 2.0, 1.5, 3.0]
STEPS = 20
CANARY_BYTES = 32 << 10
STEP_TENSOR_BYTES = 2 * 4 * 32 * 16 * 4  # per step, each of 2 experts: inputs, outputs and their gradients, float32


@dataclass
class Swarm:
    net: Network
    dhts: list[HostProcess]
    admins: list[str]  # each dht's admin endpoint, reachable from the test process
    locals: list[str]  # each dht's local API, as its host sees it (for --dht-local)
    started: float  # time.monotonic() when the first dht started
    services: dict[str, HostProcess] = field(default_factory=dict)


def admin_of(host: Host, process: HostProcess, pattern: str = ADMIN) -> str:
    return f"http://{host.forward(int(process.wait_for(pattern, 90).group(1)))}"


def status(admin: str) -> dict[str, Any]:
    return httpx.get(f"{admin}/status", timeout=5).json()


def wait_status(admin: str, check: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60.0) -> dict:
    """The first /status of `admin` that passes `check` (polled; fails naming `what` after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        current = status(admin)
        if check(current):
            return current
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s; last /status: {current}"
        time.sleep(0.5)


def state(current: dict[str, Any]) -> str | None:
    return current.get("reachability", {}).get("state")


def relayed(current: dict[str, Any]) -> bool:
    return state(current) == "relayed" and PeerAddress.parse(current["address"]).endpoint.relayed


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    reason = nat_skip_reason()
    if reason:
        pytest.skip(reason)
    with Network(LINKS) as net:
        relay = ("--relay", "--relay-port", RELAY_PORT)
        started = time.monotonic()
        first = net.hosts[0].apiary("dht", "--new-swarm", "--port", DHT_PORT, *relay, *CHECKS)
        bootstrap = first.wait_for(r"others join with: --initial-peers (\S+)").group(1)
        dhts = [first, *(host.apiary("dht", "--port", DHT_PORT, "--initial-peers", bootstrap, *CHECKS,
                                     *(relay if host.index == 1 else ())) for host in net.hosts[1:6])]
        matches = [process.wait_for(rf"local API: (\S+)\s+{ADMIN}", 90) for process in dhts]
        admins = [f"http://{host.forward(int(match.group(2)))}" for host, match in zip(net.hosts, matches)]
        yield Swarm(net, dhts, admins, [match.group(1) for match in matches], started)
    assert net.leftovers() == []


def test_a_verdicts_for_public_natted_and_firewalled_nodes(swarm: Swarm) -> None:
    hosts = swarm.net.hosts
    for host, admin in zip(hosts[:3], swarm.admins[:3]):
        current = wait_status(admin, lambda s: state(s) == "public", f"{host.name} public", 90)
        assert PeerAddress.parse(current["address"]).endpoint == Endpoint(host.address, int(DHT_PORT))
    for host, admin in zip(hosts[3:6], swarm.admins[3:6]):
        current = wait_status(admin, relayed, f"{host.name} ({host.link.nat}) relayed", 90)
        reachability = current["reachability"]
        assert reachability["observed_host"] == host.public_address, (host, reachability)
        assert "behind" in reachability["detail"] or "relay" in reachability["detail"], reachability
        relays = {PeerAddress.parse(current["address"]).endpoint.host}
        assert relays <= {hosts[0].address, hosts[1].address}, current
        assert len(reachability["relayed_addresses"]) == 2, reachability  # one reservation at each relay
    print(f"(a) every verdict {time.monotonic() - swarm.started:.1f} s after the first dht node started")


def test_i_a_wrong_announce_host_is_reported_with_the_observed_one(swarm: Swarm) -> None:
    host = swarm.net.hosts[2]
    wrong = host.apiary("dht", "--port", "7001", "--announce-host", "192.168.1.5", "--initial-peers",
                        swarm.dhts[0].wait_for(r"--initial-peers (\S+)").group(1), *CHECKS)
    admin = admin_of(host, wrong)
    current = wait_status(admin, lambda s: s.get("reachability", {}).get("announce_problem"), "announce problem", 60)
    problem = current["reachability"]["announce_problem"]
    assert "192.168.1.5" in problem and host.public_address in problem, problem
    assert "192.168.1.5" in wrong.stderr() and host.public_address in wrong.stderr(), wrong.report()
    metrics = httpx.get(f"{admin}/metrics", timeout=5).text
    assert "apiary_dht_announce_mismatch 1.0" in metrics, metrics[-2000:]
    wrong.terminate()


async def test_d_records_stored_through_natted_dht_nodes_are_found_by_everyone(swarm: Swarm) -> None:
    hosts = swarm.net.hosts
    for admin in swarm.admins[3:]:
        wait_status(admin, relayed, "relayed", 90)
    expiration = time.time() + 300
    async with ChannelPool() as pool:
        clients = [DHTClient(host.forward(Endpoint.parse(local)), pool, timeout=30)
                   for host, local in zip(hosts, swarm.locals)]
        for index in (3, 4):
            assert await clients[index].store(f"written behind nat {index}", {"by": hosts[index].name}, expiration)
        for reader in clients:
            for index in (3, 4):
                found = await reader.get(f"written behind nat {index}")
                assert found is not None and found.value == {"by": hosts[index].name}
        natted = {status(admin)["peer_id"]: status(admin)["address"] for admin in swarm.admins[3:5]}
        contacts = [contact for client in clients[:3] for contact in await client.contacts(64)]
    known = {contact.peer_id: contact for contact in contacts if contact.peer_id in natted}
    assert set(known) == set(natted), (natted, contacts)  # full members of the DHT, not clients
    assert all(contact.endpoint.relayed for contact in known.values()), known


def test_g_the_relay_carries_ciphertext_only(swarm: Swarm) -> None:
    hosts = swarm.net.hosts
    target = PeerAddress.parse(status(swarm.admins[3])["address"])  # h3's dht node, relayed
    relay = next(host for host in hosts[:2] if host.address == target.endpoint.host)
    canary = secrets.token_hex(16)
    capture = relay.python("-m", "net.tools", "capture", "--device", "eth0", "--seconds", "12", "--pattern", canary)
    capture.wait_for("listening", 20)
    relay.python("-m", "net.tools", "listen", "--port", "5003").wait_for("listening", 20)
    # the control: the same text in the clear to the relay's host is seen
    control = hosts[2].python("-m", "net.tools", "connect", "--to", f"{relay.address}:5003", "--send", canary)
    assert control.result(20)["connected"] is True
    sent = hosts[4].python("-m", "net.canary", "--to", str(target), "--text", canary, "--bytes", str(CANARY_BYTES))
    assert sent.result(60) == {"sunk": CANARY_BYTES}, sent.report()
    seen = capture.result(40)
    assert seen["bytes"] >= 2 * CANARY_BYTES, seen  # both legs of the circuit passed the capture
    assert [flow.rpartition(":")[2] for flow in seen["found"]] == ["5003"], seen  # only the control's bytes


def start_averager(swarm: Swarm, index: int) -> HostProcess:
    host = swarm.net.hosts[index]
    return host.apiary("averager", *ROUND_OPTIONS, "--dht-local", swarm.locals[index])


async def test_c_four_averagers_two_behind_nats_all_in_node_mode_end_rounds_with_the_exact_mean(swarm: Swarm) -> None:
    hosts = [swarm.net.hosts[i] for i in (0, 2, 3, 4)]
    for admin in swarm.admins[3:]:  # the averagers' dht nodes behind the NATs are reached through relays first
        wait_status(admin, relayed, "relayed", 90)
    averagers = [start_averager(swarm, host.index) for host in hosts]
    admins = [admin_of(host, process) for host, process in zip(hosts, averagers)]
    for host, admin in zip(hosts[2:], admins[2:]):
        wait_status(admin, relayed, f"{host.name}'s averager relayed", 90)
    async with ChannelPool() as pool:
        trainers = [AveragerClient(host.forward(Endpoint.parse(process.wait_for(r"local API: (\S+)").group(1))),
                                   pool, timeout=20, round_timeout=60) for host, process in zip(hosts, averagers)]
        generator = torch.Generator().manual_seed(15)
        inputs = [[torch.randn(shape, generator=generator) for shape in SHAPES] for _ in hosts]
        tensors = [[t.clone() for t in ts] for ts in inputs]
        for trainer, ts in zip(trainers, tensors):
            await trainer.register(ts, use_shared_memory=False)
        sizes = await asyncio.wait_for(
            asyncio.gather(*(t.average(ts, weight=w) for t, ts, w in zip(trainers, tensors, WEIGHTS))), 90)
    assert sizes == [4, 4, 4, 4], [t.last_outcome for t in trainers]
    wrong = []
    for index, parts in enumerate(zip(*inputs)):
        expected = sum(w * x.double() for w, x in zip(WEIGHTS, parts)) / sum(WEIGHTS)
        for peer in range(4):
            off = ~torch.isclose(tensors[peer][index].double(), expected, atol=1e-5, rtol=1e-5)
            if off.any():
                where = off.flatten().nonzero().flatten()
                span = slice(int(where.min()), int(where.max()) + 1)
                wrong.append(f"{hosts[peer].name} tensor {index}: {len(where)} of {off.numel()} wrong, flat "
                             f"{span.start}..{span.stop - 1}: {explain(hosts, parts, tensors[peer][index], span)}")
    assert not wrong, (wrong, [t.last_outcome for t in trainers])
    for host, admin in zip(hosts, admins):  # the NATed ones reduced spans: node mode, not client
        assert status(admin)["mode"] == "node", (host, status(admin))
    for process in averagers:
        assert process.alive, process.report()
        process.terminate()


def relay_bytes(admin: str) -> float:
    for line in httpx.get(f"{admin}/metrics", timeout=5).text.splitlines():
        if line.startswith("apiary_dht_relay_bytes_total"):
            return float(line.split()[-1])
    raise AssertionError("no relay bytes metric")


def direct_bytes(source: Host, target: Host) -> int:
    """Bytes of the connections `source` opened (through its NAT) that reached `target`'s public address."""
    return sum(flow.bytes for flow in source.flows()
               if flow.destination.rpartition(":")[0] == target.public_address and flow.state != "SYN_SENT")


def explain(hosts: list[Host], parts: tuple[torch.Tensor, ...], got: torch.Tensor, span: slice) -> str:
    """Which members' weighted mean a wrong span of an averaging result is (a part left out)."""
    for size in (3, 2, 1):
        for members in itertools.combinations(range(len(parts)), size):
            mean = sum(WEIGHTS[i] * parts[i].flatten()[span].double() for i in members) / sum(WEIGHTS[i] for i in members)
            if torch.allclose(mean, got.flatten()[span].double(), atol=1e-5, rtol=1e-5):
                return f"the mean of {[hosts[i].name for i in members]} alone"
    return "no subset's mean"


def moe_trainer(swarm: Swarm, steps: int, *extra: str, index: int = 4) -> HostProcess:
    """`net.moe_client` on host `index` (default: behind the symmetric NAT, through its dht service)."""
    host = swarm.net.hosts[index]
    dht = ("--dht-local", swarm.locals[index]) if index < len(swarm.locals) else \
        ("--initial-peers", swarm.dhts[0].wait_for(r"--initial-peers (\S+)").group(1))
    return host.python("-m", "net.moe_client", *dht, "--grid", "1,2", "--k-best", "2", "--k-min", "2", "--steps",
                       str(steps), "--timeout", "5", *extra, env={"OMP_NUM_THREADS": "1"},
                       name=f"moe trainer on {host.name} ({host.link.nat})")


@pytest.fixture(scope="module")
def experts(swarm: Swarm) -> tuple[HostProcess, str]:
    """The expert server behind the cone NAT, declared at its relayed address; its admin URL."""
    host = swarm.net.hosts[3]
    server = start_expert_server(host, "ffn.0.[0:2]", "--dht-local", swarm.locals[3], *CHECKS)
    admin = f"http://{host.forward(int(server.wait_for(SERVED, 90).group(1)))}"
    wait_status(admin, relayed, "the expert server relayed", 90)
    wait_until_declared(host, server)
    return server, admin


def test_b_a_trainer_behind_one_nat_trains_through_experts_behind_the_other(
        swarm: Swarm, experts: tuple[HostProcess, str]) -> None:
    before = sum(relay_bytes(admin) for admin in swarm.admins[:2])
    trainer = moe_trainer(swarm, STEPS)
    report = trainer.result(120)
    assert trainer.wait(10) == 0, trainer.report()
    assert all(step["answered"] == {"0": 64} for step in report["steps"]), report["steps"]  # 32 samples × 2 experts
    assert report["loss_end"] < report["loss_start"], report
    # a symmetric NAT cannot be punched through: every step's activations and gradients went through a relay
    assert direct_bytes(swarm.net.hosts[4], swarm.net.hosts[3]) == 0, swarm.net.hosts[4].flows()
    carried = sum(relay_bytes(admin) for admin in swarm.admins[:2]) - before
    assert carried >= STEPS * STEP_TENSOR_BYTES, carried
    print(f"(b) {STEPS} steps through the relays, median {report['median_seconds'] * 1000:.0f} ms; the relays carried "
          f"{carried / 1e3:.0f} kB ({STEPS * STEP_TENSOR_BYTES / 1e3:.0f} kB of tensors); "
          f"loss {report['loss_start']:.3f} -> {report['loss_end']:.3f}")
    assert experts[0].alive, experts[0].report()


def test_h_behind_two_cone_nats_the_trainer_moves_to_a_direct_connection(
        swarm: Swarm, experts: tuple[HostProcess, str]) -> None:
    before = sum(relay_bytes(admin) for admin in swarm.admins[:2])
    trainer = moe_trainer(swarm, STEPS, index=6)  # behind a second cone NAT, an embedded client-mode DHT node
    report = trainer.result(120)
    assert trainer.wait(10) == 0, trainer.report()
    assert all(step["answered"] == {"0": 64} for step in report["steps"]), report["steps"]
    direct = direct_bytes(swarm.net.hosts[6], swarm.net.hosts[3])
    carried = sum(relay_bytes(admin) for admin in swarm.admins[:2]) - before
    print(f"(h) cone to cone: {direct / 1e3:.0f} kB over direct connections, the relays carried {carried / 1e3:.0f} kB "
          f"in all ({STEPS} steps, {STEPS * STEP_TENSOR_BYTES / 1e3:.0f} kB of tensors)")
    assert direct >= STEPS * STEP_TENSOR_BYTES / 2, swarm.net.hosts[6].flows()  # most steps went direct


def test_e_the_relay_is_killed_mid_training_and_training_goes_on(
        swarm: Swarm, experts: tuple[HostProcess, str]) -> None:
    server, admin = experts
    hosts = swarm.net.hosts
    primary = PeerAddress.parse(status(admin)["address"]).endpoint.host
    killed = next(index for index in (0, 1) if hosts[index].address == primary)
    trainer = moe_trainer(swarm, 40, "--tolerate-failures", "--progress", "--step-pause", "0.25")
    trainer.wait_for(r"^step 5 done", 90)
    swarm.dhts[killed].kill()  # SIGKILL
    killed_at = time.monotonic()
    moved = wait_status(admin, lambda s: relayed(s) and PeerAddress.parse(s["address"]).endpoint.host != primary,
                        "the expert server's reservations moved to the other relay", 30)
    moved_after = time.monotonic() - killed_at
    survivor = hosts[1 - killed].address
    assert PeerAddress.parse(moved["address"]).endpoint.host == survivor, moved
    assert {Endpoint.parse(e).host for e in moved["reachability"]["relayed_addresses"]} == {survivor}, moved
    report = trainer.result(150)
    assert trainer.wait(10) == 0, trainer.report()
    steps = report["steps"]
    failed = [number for number, step in enumerate(steps) if "failed" in step]
    assert len(failed) <= 12, steps  # the steps around the kill may fail ...
    assert all(step.get("answered") == {"0": 64} for step in steps[-10:]), steps  # ... then training goes on
    print(f"(e) the expert server announced the other relay {moved_after:.1f} s after the kill; steps failed: "
          f"{failed} of {len(steps)}; loss {report['loss_start']:.3f} -> {report['loss_end']:.3f}")
    assert server.alive, server.report()

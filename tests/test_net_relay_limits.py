"""A relay refuses circuits past its limits and strangers in a private run (issue 15, case f):
real processes of the real CLI in network namespaces, peers behind real NATs (`net.nat`).

Four hosts of one private run (authority and tokens from `apiary token`):
- h0, public: the relay, `apiary dht --relay` with room for one reservation and one circuit
  per dialing host (`--relay-max-reservations 1 --relay-max-circuits-per-peer 1`);
- h1, behind a cone NAT: a token holder's `apiary dht --reachability relayed`: it reserves at
  h0 (the one reservation) and announces its relayed address;
- h2, behind another cone NAT: another token holder, dialing with `net.relay_dialer`: its own
  reservation is refused (no room), its first circuit to h1 answers, a second one while the
  first is open is refused, and one opened after the first closed answers again;
- h3, behind a symmetric NAT: a stranger holding a token of another run, dialing the same way:
  every reservation and circuit refused.
The relay's /metrics count each refusal by its reason, and h1 stays reachable through it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from net.network import Host, Link, Network, nat_skip_reason, skip_reason
from net.processes import HostProcess

from apiary.wire import Identity, PeerAddress

pytestmark = [pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""), pytest.mark.timeout(180)]

LINKS = [Link(), Link(nat="cone"), Link(nat="cone"), Link(nat="symmetric")]
DHT_PORT, RELAY_PORT = "7000", "7300"
STARTED = r"local API: \S+\s+admin: http://127\.0\.0\.1:(\d+)"


def apiary_token(*args: str) -> subprocess.Popen[str]:
    """`apiary token <args>` in this process's namespace (the run's files are plain files)."""
    return subprocess.Popen([sys.executable, "-m", "apiary.cli.main", "token", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen[str]) -> str:
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, f"{process.args}: {stderr}"
    return stdout


def private_runs(directory: Path, members: list[Identity], stranger: Identity) -> tuple[str, list[Path], str, Path]:
    """Our run (its authority, a token file per member) and another run whose token the stranger holds."""
    keys = [directory / "authority.key", directory / "other-authority.key"]
    authorities = [re.search(r"run authority: (\S+)", finished(p)).group(1)  # type: ignore[union-attr]
                   for p in [apiary_token("authority", "--authority-key", str(key), "--create") for key in keys]]
    holders = [(keys[0], member, directory / f"member-{i}.token") for i, member in enumerate(members)]
    issued = [apiary_token("issue", "--authority-key", str(key), "--peer-id", peer.peer_id, "--expires-in", "3600",
                           "--output", str(path))
              for key, peer, path in [*holders, (keys[1], stranger, directory / "stranger.token")]]
    for process in issued:
        finished(process)
    return authorities[0], [path for _, _, path in holders], authorities[1], directory / "stranger.token"


def saved(identity: Identity, path: Path) -> str:
    identity.save(path)
    return str(path)


def admin(host: Host, process: HostProcess) -> str:
    return f"http://{host.forward(int(process.wait_for(STARTED, 90).group(1)))}"


def relayed_address(admin_url: str, timeout: float = 60.0) -> PeerAddress:
    """The relayed address the service at `admin_url` announces, once it holds a reservation."""
    deadline = time.monotonic() + timeout
    while True:
        current = httpx.get(f"{admin_url}/status", timeout=5).json()
        if current.get("reachability", {}).get("state") == "relayed" and current.get("address"):
            address = PeerAddress.parse(current["address"])
            if address.endpoint.relayed:
                return address
        assert time.monotonic() < deadline, f"no relayed address after {timeout:.0f} s; last /status: {current}"
        time.sleep(0.5)


def refusals(admin_url: str) -> dict[str, float]:
    """The relay's refusals by reason, from its /metrics."""
    text = httpx.get(f"{admin_url}/metrics", timeout=5).text
    return {m[1]: float(m[2]) for m in re.finditer(r'^apiary_dht_relay_refused_total\{reason="(\w+)"\} (\S+)$',
                                                     text, re.MULTILINE)}


def steps(process: HostProcess) -> dict[str, dict]:
    """The four steps `net.relay_dialer` reports, by name."""
    results = [process.result(90) for _ in range(4)]
    assert process.wait(20) == 0, process.report()
    return {result["step"]: result for result in results}


def test_a_relay_refuses_circuits_past_its_limits_and_strangers_in_a_private_run(tmp_path: Path) -> None:
    reason = nat_skip_reason()
    if reason:
        pytest.skip(reason)
    relay_id, holder_id, dialer_id, stranger_id = (Identity.generate() for _ in range(4))
    authority, tokens, other_authority, stranger_token = private_runs(tmp_path, [relay_id, holder_id, dialer_id],
                                                                      stranger_id)
    with Network(LINKS) as net:
        h0, h1, h2, h3 = net.hosts

        def member(index: int, identity: Identity) -> tuple[str, ...]:
            return ("--identity", saved(identity, tmp_path / f"h{index}.key"), "--run-authority", authority,
                    "--access-token", str(tokens[index]))

        relay = h0.apiary("dht", "--new-swarm", "--port", DHT_PORT, "--reachability", "public", "--relay",
                          "--relay-port", RELAY_PORT, "--relay-max-reservations", "1",
                          "--relay-max-circuits-per-peer", "1", *member(0, relay_id))
        bootstrap = relay.wait_for(r"others join with: --initial-peers (\S+)").group(1)
        relay_admin = admin(h0, relay)
        holder = h1.apiary("dht", "--initial-peers", bootstrap, "--port", DHT_PORT, "--reachability", "relayed",
                           "--relays", "1", *member(1, holder_id))
        holder_admin = admin(h1, holder)
        address = relayed_address(holder_admin)
        assert address.peer_id == holder_id.peer_id and address.endpoint.relay_peer == relay_id.peer_id, address

        relay_address = f"{relay_id.peer_id}@{h0.address}:{RELAY_PORT}"
        dial = ("-m", "net.relay_dialer", "--relay", relay_address, "--target", str(address))
        dialer = h2.python(*dial, *member(2, dialer_id), name="h2: token holder dialing")
        stranger = h3.python(*dial, "--identity", saved(stranger_id, tmp_path / "h3.key"),
                             "--run-authority", other_authority, "--access-token", str(stranger_token),
                             name="h3: stranger dialing")
        by_holder, by_stranger = steps(dialer), steps(stranger)

        # the token holder: no room for its reservation; one circuit at a time, each answered by h1
        assert "refused (reservations)" in by_holder["reserve"].get("error", ""), by_holder
        assert "relay_max_reservations=1" in by_holder["reserve"]["error"], by_holder
        assert by_holder["held"].get("peer_id") == holder_id.peer_id, by_holder
        assert "refused (circuits_per_peer)" in by_holder["second"].get("error", ""), by_holder
        assert "relay_max_circuits_per_peer=1" in by_holder["second"]["error"], by_holder
        assert by_holder["after"].get("peer_id") == holder_id.peer_id, by_holder
        # the stranger: its token is another run's, refused at every step
        for step in ("reserve", "held", "second", "after"):
            assert "AccessDenied" in by_stranger[step].get("error", ""), by_stranger
            assert "access_token_invalid" in by_stranger[step]["error"], by_stranger

        counted = refusals(relay_admin)
        assert counted.get("reservations", 0) >= 1, counted
        assert counted.get("circuits_per_peer", 0) >= 1, counted
        assert counted.get("access_token_invalid", 0) >= 4, counted
        assert relayed_address(holder_admin) == address  # its reservation held through all of it
        for process in (relay, holder):
            assert process.alive, process.report()
    assert net.leftovers() == []

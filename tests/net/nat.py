"""Real NATs for the test network: the kernel's conntrack and iptables, no user-space filter.

A host whose link says `nat="cone"` or `nat="symmetric"` sits behind a router namespace
`<prefix>-r<i>`:

    host h<i>: eth0 10.<i+1>.0.2/24, default via 10.<i+1>.0.1
        | veth
    router r<i>: lan0 10.<i+1>.0.1/24 -- forwarding, MASQUERADE -- eth0 198.18.0.<i+1>/24
        | veth (or the latency relay's TAPs)
    switch: bridge br0

The router's `eth0` is the host's link to the switch: it carries the rate limit (tbf) and,
where the link has latency, the relay's TAPs, exactly as a public host's `eth0` does.

The models (what `Link.nat` means):
- "cone": MASQUERADE, which keeps the source port where the public tuple stays unique (with
  one host per router: always), so a source port maps to the same public port whatever the
  destination (endpoint-independent mapping). Inbound, only packets of flows the host opened
  pass (conntrack ESTABLISHED/RELATED), which is the "port-restricted" filtering of a home
  router: two such hosts that know each other's mapped ports can open a TCP connection by
  simultaneous open, since each one's SYN opens the hole the other's SYN comes through.
- "symmetric": MASQUERADE --random-fully: every new flow gets a random public port, so each
  destination sees another port (a carrier-grade or corporate NAT); the mapping one peer
  observes is useless to a third, and hole punching fails.
- "firewall": no router and no translation: the host keeps its public address, and iptables in
  its own namespace drops every packet that does not belong to a flow it opened (a campus or
  cloud firewall that drops inbound SYNs).

Packets to the router's own address that belong to no flow are dropped as well (never
answered with a reset), so an unsolicited SYN times out, as behind a real NAT.

`iptables` (Debian's package, nf_tables backend) is installed with apt-get where missing;
`iptables_missing()` says why not when it cannot be.
"""

from __future__ import annotations

import functools
import re
import subprocess
from dataclasses import dataclass

from deploy.apt import NotInstallable, ensure_tools

KINDS = ("cone", "symmetric", "firewall")
ROUTED = ("cone", "symmetric")  # the kinds with a router namespace (translation)

# conntrack lets in what answers a flow from inside; everything else from outside is dropped
# (the router's: towards the host and towards itself; the firewall's: towards the host)
_FILTER_ROUTER = """*filter
-A INPUT -i eth0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A INPUT -i eth0 -j DROP
-A FORWARD -i eth0 -o lan0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A FORWARD -i eth0 -o lan0 -j DROP
COMMIT
"""
FIREWALL_RULES = """*filter
-A INPUT -i eth0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A INPUT -i eth0 -j DROP
COMMIT
"""


@functools.cache
def iptables_missing() -> str | None:
    """Why iptables cannot be used here (None: it can); installs Debian's package where missing."""
    try:
        ensure_tools({"iptables-restore": "iptables"})
    except NotInstallable as e:
        return f"NAT tests need iptables: {e}"
    return None


def private_subnet(index: int) -> str:
    """The first three octets of host `index`'s private network behind its router."""
    return f"10.{index + 1}.0"


def router_rules(kind: str, index: int) -> str:
    """The router's iptables ruleset: masquerade the private network, filter what comes in."""
    if kind not in ROUTED:
        raise ValueError(f"a router translates for {ROUTED}, not {kind!r}")
    random = " --random-fully" if kind == "symmetric" else ""
    nat = f"*nat\n-A POSTROUTING -s {private_subnet(index)}.0/24 -o eth0 -j MASQUERADE{random}\nCOMMIT\n"
    return nat + _FILTER_ROUTER


def router_commands(router: str, host: str, index: int) -> list[list[str]]:
    """The private link between `host` and `router`, and forwarding (the router's `eth0`, its
    switch link, is the caller's; its rules are `router_rules`)."""
    subnet = private_subnet(index)
    return [
        ["ip", "-n", router, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", host],
        ["ip", "-n", router, "addr", "add", f"{subnet}.1/24", "dev", "lan0"],
        ["ip", "-n", router, "link", "set", "lan0", "up"],
        ["ip", "netns", "exec", router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
         "net.netfilter.nf_conntrack_acct=1"],  # bytes per flow, for `flows`
        ["ip", "-n", host, "addr", "add", f"{subnet}.2/24", "dev", "eth0"],
        ["ip", "-n", host, "link", "set", "eth0", "up"],
        ["ip", "-n", host, "route", "add", "default", "via", f"{subnet}.1"],
    ]


def restore(namespace: str, rules: str) -> None:
    """Loads an iptables ruleset into `namespace`."""
    result = subprocess.run(["ip", "netns", "exec", namespace, "iptables-restore"], input=rules, check=False,
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"iptables-restore in {namespace} failed ({result.returncode}): {result.stderr.strip()}"
                           f"\n{rules}")


@dataclass(frozen=True)
class Flow:
    """A TCP connection through a router, as its conntrack table has it (before translation)."""

    source: str  # host:port inside
    destination: str  # host:port outside
    state: str  # ESTABLISHED, TIME_WAIT, ...
    bytes: int  # both directions


_TCP_FLOW = re.compile(r"\btcp\s+6\s+\d+\s+(\S+)\s+src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)"
                       r" packets=\d+ bytes=(\d+).*?bytes=(\d+)")


def flows(router: str) -> list[Flow]:
    """The TCP connections the router `router` translates now (or did recently)."""
    result = subprocess.run(["ip", "netns", "exec", router, "cat", "/proc/net/nf_conntrack"], check=True,
                            capture_output=True, text=True, timeout=30)
    return [Flow(f"{m[2]}:{m[4]}", f"{m[3]}:{m[5]}", m[1], int(m[6]) + int(m[7]))
            for m in map(_TCP_FLOW.search, result.stdout.splitlines()) if m]

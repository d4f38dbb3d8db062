"""Observed addresses: where other peers see this node's connections come from.

Every `Ping` reply (and every DHT reply) tells the caller the address its call came from
(`observed_endpoint` of gRPC's transport peer). A node without a configured announced host
learns its public one from `ObservedAddresses`: the host reported by a majority of distinct
peers, and by at least `quorum` of them, so that no single peer can make it announce an address
of its choosing. `announce_problem` is the one line reported when a configured announced host
cannot be dialled from where the peers are (private, loopback, link-local or documentation
address) while they observe a public one.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections import Counter, OrderedDict

from apiary.wire.address import AddressError, Endpoint

PUBLIC, PRIVATE, LOOPBACK, LINK_LOCAL, DOCUMENTATION, NAME = (
    "public", "private", "loopback", "link-local", "documentation", "name")

# RFC 5737 (IPv4) and RFC 3849 (IPv6): for examples only, never routed.
_DOCUMENTATION = tuple(ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24",
                                                         "2001:db8::/32"))
# RFC 2544's benchmarking range is not globally routed, but tests/net's network namespaces model
# the public internet with it: counted public here, so that those tests see NATs as a user would.
_BENCHMARKING = ipaddress.ip_network("198.18.0.0/15")

_WHY = {
    PRIVATE: "a private address",
    LOOPBACK: "a loopback address",
    LINK_LOCAL: "a link-local address",
    DOCUMENTATION: "a documentation address (RFC 5737/3849, never routed)",
}


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address `host` names (IPv4-mapped IPv6 as IPv4), None for a DNS name."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def host_scope(host: str) -> str:
    """Where `host` can be dialled from: "public", "private" (any other non-global address:
    RFC 1918, unique-local, shared CGNAT space, unspecified), "loopback", "link-local",
    "documentation", or "name" (a DNS name, not resolved here)."""
    address = _ip(host)
    if address is None:
        return NAME
    if address.is_loopback:
        return LOOPBACK
    if address.is_link_local:
        return LINK_LOCAL
    if any(address in network for network in _DOCUMENTATION):
        return DOCUMENTATION
    if address in _BENCHMARKING or address.is_global:
        return PUBLIC
    return PRIVATE


def observed_endpoint(transport_peer: str) -> Endpoint | None:
    """The host and port of a gRPC transport peer (`ipv4:1.2.3.4:5678`, `ipv6:%5B::1%5D:5678`),
    IPv4-mapped IPv6 hosts as IPv4; None for other kinds of peer (e.g. a unix socket)."""
    kind, _, address = transport_peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host, _, port = urllib.parse.unquote(address).rpartition(":")
    ip = _ip(host)
    if ip is None or not port.isdigit():
        return None
    try:
        return Endpoint(str(ip), int(port))
    except AddressError:
        return None


def observed_address(transport_peer: str) -> str:
    """`observed_endpoint` as the text replies carry ("" when unknown)."""
    endpoint = observed_endpoint(transport_peer)
    return "" if endpoint is None else str(endpoint)


def observed_host(address: str) -> str | None:
    """The host of an `observed_address` a reply carried; None if empty or malformed."""
    try:
        return Endpoint.parse(address).host if address else None
    except AddressError:
        return None


class ObservedAddresses:
    """The hosts distinct peers report seeing this node at; `majority()` is what to believe.

    A reporter's new report replaces its earlier one; the `max_reporters` most recent reporters
    are kept."""

    def __init__(self, quorum: int = 2, *, max_reporters: int = 256) -> None:
        if quorum < 2:
            raise ValueError(f"quorum={quorum}: an observed address needs at least 2 distinct reporters")
        self.quorum = quorum
        self.max_reporters = max_reporters
        self._reports: OrderedDict[str, str] = OrderedDict()

    def report(self, reporter_peer_id: str, observed_host: str) -> None:
        """Records that `reporter_peer_id` sees this node's connections come from `observed_host`."""
        self._reports.pop(reporter_peer_id, None)
        self._reports[reporter_peer_id] = observed_host
        while len(self._reports) > self.max_reporters:
            self._reports.popitem(last=False)

    def majority(self) -> str | None:
        """The host reported by more than half of the distinct reporters and by at least
        `quorum` of them; None while there is none."""
        if not self._reports:
            return None
        host, count = Counter(self._reports.values()).most_common(1)[0]
        return host if count >= self.quorum and 2 * count > len(self._reports) else None

    def __len__(self) -> int:
        return len(self._reports)


def announce_problem(announced_host: str, observed_host: str | None) -> str | None:
    """One line saying why `announced_host` cannot be dialled by peers that observe this node at
    the public `observed_host`, and what to set instead; None when there is nothing wrong to tell
    (no public observation, or an announced public address or DNS name)."""
    if observed_host is None or host_scope(observed_host) != PUBLIC:
        return None
    why = _WHY.get(host_scope(announced_host))
    if why is None:
        return None
    return (f"announced host {announced_host} is {why} but peers see this node at {observed_host}: set "
            f"--announce-host {observed_host} (APIARY_ANNOUNCE_HOST) or leave it empty to use what peers observe")

"""Network addresses: where a server listens, and the address it announces to other peers.

A peer may listen on 0.0.0.0 inside a container while others reach it at a public host and
a forwarded port, so the two are separate settings. A peer's full address is
`<peer_id>@<host>:<port>`; the peer id part is optional where only reachability matters.

A peer that cannot be dialled (behind a NAT or a firewall) is reached through a relay
(`apiary.wire.relay`): its endpoint is then the relay's circuit port, the relay's peer id and
its own, written `<relay-host>:<port>/via/<relay-peer-id>/to/<peer-id>`; as a full address,
`<peer-id>@<relay-host>:<port>/via/<relay-peer-id>` (the `/to/` part is the address's peer id).
Every record that names a peer carries whichever of the two forms reaches it.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from apiary.wire.identity import IdentityError, public_key_from_peer_id


class AddressError(ValueError):
    """An address string could not be parsed."""


VIA, TO = "/via/", "/to/"


@dataclass(frozen=True, order=True)
class Endpoint:
    """A host (name, IPv4 or IPv6) and a TCP port; relayed, also the relay's peer id and the
    peer it splices to (then host:port is the relay's circuit port)."""

    host: str
    port: int
    relay_peer: str = ""  # relayed: the relay's peer id ("" for a direct endpoint)
    target_peer: str = ""  # relayed: the peer the relay connects to

    def __post_init__(self) -> None:
        if not self.host:
            raise AddressError("an endpoint needs a host")
        if not 0 <= self.port <= 65535:
            raise AddressError(f"port {self.port} is outside 0..65535")
        if bool(self.relay_peer) != bool(self.target_peer):
            raise AddressError("a relayed endpoint names both the relay's peer id and its target's")
        for name, peer_id in (("relay", self.relay_peer), ("target", self.target_peer)):
            if peer_id:
                try:
                    public_key_from_peer_id(peer_id)
                except IdentityError as e:
                    raise AddressError(f"the {name} of a relayed endpoint: {e}") from None

    @property
    def relayed(self) -> bool:
        """Reached through a relay rather than dialled directly."""
        return bool(self.relay_peer)

    @property
    def direct(self) -> Endpoint:
        """The host and port alone: the relay's circuit port for a relayed endpoint."""
        return Endpoint(self.host, self.port) if self.relayed else self

    @classmethod
    def relayed_to(cls, relay: PeerAddress, target_peer: str) -> Endpoint:
        """The endpoint of `target_peer` through the relay at `relay` (which must name its peer id)."""
        if relay.peer_id is None or relay.endpoint.relayed:
            raise AddressError(f"a relay is dialled directly and names its peer id (peer_id@host:port), not {relay}")
        return cls(relay.endpoint.host, relay.endpoint.port, relay.peer_id, target_peer)

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parses `host:port`, `[ipv6]:port` or `host:port/via/<relay-peer-id>/to/<peer-id>`."""
        text = text.strip()
        text, relay_peer, target_peer = _split_relay(text)
        if relay_peer and not target_peer:
            raise AddressError(f"{text}{VIA}{relay_peer}: a relayed endpoint names its target ({TO}<peer-id>), "
                               f"or is written <peer-id>@{text}{VIA}{relay_peer}")
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
        else:
            host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise AddressError(f"{text!r} is not host:port (IPv6 hosts in brackets: [::1]:port)")
        return cls(host, int(port), relay_peer, target_peer)

    def __str__(self) -> str:
        return self._text

    @functools.cached_property
    def _text(self) -> str:  # written into every DHT message that names a node: made once
        direct = f"[{self.host}]:{self.port}" if _is_ipv6(self.host) else f"{self.host}:{self.port}"
        return f"{direct}{VIA}{self.relay_peer}{TO}{self.target_peer}" if self.relayed else direct


@functools.lru_cache(maxsize=1 << 16)  # endpoints are written into every DHT message
def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def _split_relay(text: str) -> tuple[str, str, str]:
    """`host:port[/via/<relay>[/to/<target>]]` -> (host:port, relay, target)."""
    direct, via, rest = text.partition(VIA)
    if not via:
        if "/" in text:
            raise AddressError(f"{text!r} is not host:port (a relayed address reads host:port{VIA}<relay-peer-id>)")
        return text, "", ""
    relay_peer, to, target_peer = rest.partition(TO)
    if not relay_peer or (to and not target_peer) or "/" in target_peer or "/" in relay_peer:
        raise AddressError(f"{text!r} is not host:port{VIA}<relay-peer-id>[{TO}<peer-id>]")
    return direct, relay_peer, target_peer


@dataclass(frozen=True)
class PeerAddress:
    """An endpoint, optionally with the peer id expected to answer there."""

    endpoint: Endpoint
    peer_id: str | None = None

    def __post_init__(self) -> None:
        if self.endpoint.relayed and self.peer_id not in (None, self.endpoint.target_peer):
            raise AddressError(f"{self.peer_id}@{self.endpoint}: the relay connects to {self.endpoint.target_peer}, "
                               f"not {self.peer_id}")

    @classmethod
    def parse(cls, text: str) -> PeerAddress:
        """Parses `peer_id@host:port`, `host:port`, or a relayed address
        (`peer_id@host:port/via/<relay-peer-id>`, or its endpoint form with `/to/<peer_id>`)."""
        peer_id, sep, rest = text.strip().rpartition("@")
        if sep:
            try:
                public_key_from_peer_id(peer_id)
            except IdentityError as e:
                raise AddressError(f"{text!r}: {e}") from None
            direct, relay_peer, target_peer = _split_relay(rest.strip())
            if relay_peer and not target_peer:
                rest = f"{direct}{VIA}{relay_peer}{TO}{peer_id}"
        endpoint = Endpoint.parse(rest)
        return cls(endpoint, peer_id or endpoint.target_peer or None)

    def __str__(self) -> str:
        if self.endpoint.relayed:
            return f"{self.endpoint.target_peer}@{self.endpoint.direct}{VIA}{self.endpoint.relay_peer}"
        return f"{self.peer_id}@{self.endpoint}" if self.peer_id else str(self.endpoint)


def parse_peer_list(text: str) -> list[PeerAddress]:
    """Parses a comma- or whitespace-separated list of peer addresses (empty text: no peers)."""
    return [PeerAddress.parse(part) for part in text.replace(",", " ").split()]

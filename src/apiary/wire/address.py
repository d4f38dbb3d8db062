"""Network addresses: where a server listens, and the address it announces to other peers.

A peer may listen on 0.0.0.0 inside a container while others reach it at a public host and
a forwarded port, so the two are separate settings. A peer's full address is
`<peer_id>@<host>:<port>`; the peer id part is optional where only reachability matters.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from apiary.wire.identity import IdentityError, public_key_from_peer_id


class AddressError(ValueError):
    """An address string could not be parsed."""


@dataclass(frozen=True, order=True)
class Endpoint:
    """A host (name, IPv4 or IPv6) and a TCP port."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not self.host:
            raise AddressError("an endpoint needs a host")
        if not 0 <= self.port <= 65535:
            raise AddressError(f"port {self.port} is outside 0..65535")

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parses `host:port` or `[ipv6]:port`."""
        text = text.strip()
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
        else:
            host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise AddressError(f"{text!r} is not host:port (IPv6 hosts in brackets: [::1]:port)")
        return cls(host, int(port))

    def __str__(self) -> str:
        try:
            is_v6 = ipaddress.ip_address(self.host).version == 6
        except ValueError:
            is_v6 = False
        return f"[{self.host}]:{self.port}" if is_v6 else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class PeerAddress:
    """An endpoint, optionally with the peer id expected to answer there."""

    endpoint: Endpoint
    peer_id: str | None = None

    @classmethod
    def parse(cls, text: str) -> PeerAddress:
        """Parses `peer_id@host:port` or `host:port`."""
        peer_id, sep, rest = text.strip().rpartition("@")
        if sep:
            try:
                public_key_from_peer_id(peer_id)
            except IdentityError as e:
                raise AddressError(f"{text!r}: {e}") from None
        return cls(Endpoint.parse(rest), peer_id or None)

    def __str__(self) -> str:
        return f"{self.peer_id}@{self.endpoint}" if self.peer_id else str(self.endpoint)


def parse_peer_list(text: str) -> list[PeerAddress]:
    """Parses a comma- or whitespace-separated list of peer addresses (empty text: no peers)."""
    return [PeerAddress.parse(part) for part in text.replace(",", " ").split()]

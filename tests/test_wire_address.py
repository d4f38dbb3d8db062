"""Parsing the addresses users type: host:port, [ipv6]:port, peer_id@host:port, peer lists."""

from __future__ import annotations

import pytest

from apiary.wire import AddressError, Endpoint, Identity, PeerAddress, parse_peer_list

PEER = Identity.generate().peer_id


@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        ("127.0.0.1:8000", "127.0.0.1", 8000, "127.0.0.1:8000"),
        ("dht.example.org:31337", "dht.example.org", 31337, "dht.example.org:31337"),
        ("[::1]:443", "::1", 443, "[::1]:443"),
        ("[2001:db8::7]:1", "2001:db8::7", 1, "[2001:db8::7]:1"),
        ("  localhost:0\n", "localhost", 0, "localhost:0"),
        ("host:65535", "host", 65535, "host:65535"),
    ],
)
def test_endpoint_parse(text: str, host: str, port: int, shown: str) -> None:
    endpoint = Endpoint.parse(text)
    assert endpoint == Endpoint(host, port)
    assert str(endpoint) == shown
    assert Endpoint.parse(str(endpoint)) == endpoint


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("localhost", "not host:port"),  # missing port
        ("localhost:", "not host:port"),
        (":8000", "not host:port"),  # missing host
        ("localhost:http", "not host:port"),  # non-numeric port
        ("localhost:-1", "not host:port"),
        ("[::1]", "not host:port"),
        ("[::1]8000", "not host:port"),
        ("", "not host:port"),
        ("localhost:65536", "outside 0..65535"),
    ],
)
def test_endpoint_parse_rejects_bad_input(text: str, complaint: str) -> None:
    with pytest.raises(AddressError, match=complaint):
        Endpoint.parse(text)


def test_endpoint_rejects_bad_fields() -> None:
    with pytest.raises(AddressError, match="needs a host"):
        Endpoint("", 1)
    with pytest.raises(AddressError, match="outside"):
        Endpoint("h", 70000)


def test_peer_address_with_and_without_peer_id() -> None:
    full = PeerAddress.parse(f"{PEER}@10.1.2.3:31337")
    assert full.peer_id == PEER
    assert full.endpoint == Endpoint("10.1.2.3", 31337)
    assert str(full) == f"{PEER}@10.1.2.3:31337"
    assert PeerAddress.parse(str(full)) == full

    v6 = PeerAddress.parse(f"{PEER}@[::1]:5")
    assert (v6.peer_id, v6.endpoint) == (PEER, Endpoint("::1", 5))
    assert str(v6) == f"{PEER}@[::1]:5"

    bare = PeerAddress.parse("example.org:7")
    assert bare.peer_id is None
    assert bare.endpoint == Endpoint("example.org", 7)
    assert str(bare) == "example.org:7"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("shortid@host:1", "52 characters"),
        ("@host:1", "52 characters"),
        ("1" * 52 + "@host:1", "not base32"),
        (PEER.upper() + "@host:1", "not canonical"),
        (f"{PEER}@host", "not host:port"),
        (f"{PEER}@host:port", "not host:port"),
    ],
)
def test_peer_address_rejects_bad_input(text: str, complaint: str) -> None:
    with pytest.raises(AddressError, match=complaint):
        PeerAddress.parse(text)


def test_parse_peer_list_accepts_commas_and_whitespace() -> None:
    peers = parse_peer_list(f" a.example:1, {PEER}@[::1]:2,,b.example:3\n\tc.example:4 ,")
    assert [str(peer) for peer in peers] == ["a.example:1", f"{PEER}@[::1]:2", "b.example:3", "c.example:4"]
    assert peers[1].peer_id == PEER
    assert parse_peer_list("") == []
    assert parse_peer_list(" , \n") == []
    with pytest.raises(AddressError, match="nope"):
        parse_peer_list("a.example:1, nope")


RELAY = Identity.generate().peer_id


def test_relayed_addresses_round_trip_in_both_forms() -> None:
    relayed = Endpoint.relayed_to(PeerAddress.parse(f"{RELAY}@203.0.113.9:4001"), PEER)
    assert relayed.relayed and relayed.direct == Endpoint("203.0.113.9", 4001)
    assert str(relayed) == f"203.0.113.9:4001/via/{RELAY}/to/{PEER}"
    assert Endpoint.parse(str(relayed)) == relayed
    address = PeerAddress(relayed, PEER)
    assert str(address) == f"{PEER}@203.0.113.9:4001/via/{RELAY}"
    assert PeerAddress.parse(str(address)) == address
    assert PeerAddress.parse(str(relayed)) == address  # the endpoint form names its peer too
    assert PeerAddress.parse(f"{PEER}@{relayed}") == address
    assert parse_peer_list(f"{address}, 127.0.0.1:1") == [address, PeerAddress(Endpoint("127.0.0.1", 1))]
    assert not Endpoint.parse("127.0.0.1:1").relayed


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        (f"203.0.113.9:4001/via/{RELAY}", "names its target"),
        (f"203.0.113.9:4001/via/{RELAY}/to/", "is not host:port/via/"),
        ("203.0.113.9:4001/via/nonsense/to/nonsense", "relay of a relayed endpoint"),
        (f"203.0.113.9:4001/via/{RELAY}/to/{PEER}/more", "is not host:port/via/"),
        ("203.0.113.9:4001/", "a relayed address reads"),
    ],
)
def test_malformed_relayed_endpoints_are_refused_naming_the_part(text: str, complaint: str) -> None:
    with pytest.raises(AddressError, match=complaint):
        Endpoint.parse(text)


def test_a_relayed_address_names_one_peer() -> None:
    with pytest.raises(AddressError, match=f"connects to {PEER}"):
        PeerAddress.parse(f"{RELAY}@203.0.113.9:4001/via/{RELAY}/to/{PEER}")
    with pytest.raises(AddressError, match="names its peer id"):
        Endpoint.relayed_to(PeerAddress.parse("203.0.113.9:4001"), PEER)

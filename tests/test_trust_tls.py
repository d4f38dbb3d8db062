"""Encrypted links: TLS on the public ports, servers bound to their peer ids (real processes).

An honest TLS peer (tests/trust_tls_worker.py) and `apiary dht --tls` processes are dialled as
`peer_id@host:port`; an impostor process presents a certificate in another peer's name, signed
by its own key, and must be refused by gRPC calls, bulk transfers and a DHT node joining it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography import x509
from cryptography.x509.oid import NameOID
from service_processes import APIARY, ServiceProcesses, free_port

from apiary.wire import PROBE, ChannelPool, Endpoint, Identity, PeerAddress, PeerUnavailable, RpcClient, WireSettings
from apiary.wire.bulk import BulkClient
from apiary.wire.probe import SINK_ROUTE
from apiary.wire.protos.wire_pb2 import PingRequest, SinkReply, SinkRequest
from apiary.wire.tensors import tensor_payload
from apiary.wire.tls import client_ssl_context, fetch_peer_id

WORKER = Path(__file__).with_name("trust_tls_worker.py")
TLS = WireSettings(tls=True, default_timeout=10)


class Worker:
    def __init__(self, identity: Path, *args: str):
        self.process = subprocess.Popen([sys.executable, str(WORKER), "--identity", str(identity), *args],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line:
            error = self.process.stderr.read() if self.process.stderr else ""
            raise AssertionError(f"the TLS worker did not start: {error}")
        self.info: dict[str, Any] = json.loads(line)
        self.endpoint = Endpoint("127.0.0.1", self.info["port"])
        self.bulk = Endpoint("127.0.0.1", self.info["bulk_port"])

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Worker, Worker]]:
    """An honest TLS peer and an impostor that claims the honest peer's id."""
    folder = tmp_path_factory.mktemp("tls")
    honest = Worker(folder / "honest.key")
    try:
        impostor = Worker(folder / "impostor.key", "--forge-as", honest.info["peer_id"])
    except BaseException:
        honest.stop()
        raise
    try:
        yield honest, impostor
    finally:
        impostor.stop()
        honest.stop()


async def ping(pool: ChannelPool, endpoint: Endpoint, peer_id: str | None) -> str:
    reply = await RpcClient(pool, PROBE, endpoint, peer_id=peer_id, timeout=10).call("Ping", PingRequest())
    return reply.peer_id


async def test_a_tls_peer_is_reached_by_its_id_and_no_other(peers: tuple[Worker, Worker]) -> None:
    honest, _ = peers
    peer_id = honest.info["peer_id"]
    async with ChannelPool(TLS) as pool:
        assert await ping(pool, honest.endpoint, peer_id) == peer_id
        assert await ping(pool, honest.endpoint, None) == peer_id  # no id given: the one it proves
        other = Identity.generate().peer_id
        with pytest.raises(PeerUnavailable, match=f"did not prove peer id {other}"):
            await ping(pool, honest.endpoint, other)
    async with ChannelPool(WireSettings(tls=False, default_timeout=5)) as plaintext:  # the port really speaks TLS only
        with pytest.raises(PeerUnavailable):
            await ping(plaintext, honest.endpoint, None)
    assert await fetch_peer_id(honest.endpoint, 10) == peer_id

    client = BulkClient(TLS)
    try:
        tensor = torch.arange(1 << 18, dtype=torch.float32)
        body, _ = await client.call(honest.bulk, SINK_ROUTE, body=SinkRequest(digest=True).SerializeToString(),
                                    tensors=[tensor_payload(tensor)], peer_id=peer_id)
        assert SinkReply.FromString(body).total_bytes == tensor.numel() * 4
        with pytest.raises(PeerUnavailable, match=f"proved identity {peer_id}, not"):
            await client.call(honest.bulk, SINK_ROUTE, peer_id=Identity.generate().peer_id)
    finally:
        await client.close()


async def test_a_peer_presenting_another_peers_id_is_refused(peers: tuple[Worker, Worker]) -> None:
    honest, impostor = peers
    victim = honest.info["peer_id"]
    # the impostor really presents a certificate in the victim's name
    _, writer = await asyncio.open_connection("127.0.0.1", impostor.endpoint.port, ssl=client_ssl_context(),
                                              server_hostname="")
    cert = x509.load_der_x509_certificate(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
    writer.close()
    assert cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == victim

    async with ChannelPool(TLS) as pool:
        with pytest.raises(PeerUnavailable, match=f"did not prove peer id {victim}"):
            await ping(pool, impostor.endpoint, victim)
        with pytest.raises(PeerUnavailable, match="not signed by the identity it names"):
            await ping(pool, impostor.endpoint, None)  # nor does it pass as anyone at all
    client = BulkClient(TLS)
    try:
        with pytest.raises(PeerUnavailable, match="not signed by the identity it names"):
            await client.call(impostor.bulk, SINK_ROUTE, peer_id=victim)
    finally:
        await client.close()


def test_tls_dht_nodes_join_by_peer_id_and_refuse_an_impostor(peers: tuple[Worker, Worker], tmp_path: Path) -> None:
    honest, impostor = peers
    with ServiceProcesses() as services:
        first = services.start("dht", "--new-swarm", "--tls", "--identity", str(tmp_path / "first.key")).wait_until_up()
        second = services.start("dht", "--tls", "--initial-peers", first.initial_peers).wait_until_up()
        first_id = PeerAddress.parse(first.initial_peers).peer_id
        second_id = PeerAddress.parse(second.initial_peers).peer_id
        neighbours = {n["peer_id"] for n in first.status()["neighbours"]}
        assert second_id in neighbours  # the first node was called by the second over TLS and answered

        async def call_first() -> str:
            async with ChannelPool(TLS) as pool:
                return await ping(pool, PeerAddress.parse(first.initial_peers).endpoint, first_id)

        assert asyncio.run(call_first()) == first_id

    # a node told to join the victim at the impostor's address refuses to count it as joined
    joining = subprocess.run(
        [*APIARY, "dht", "--tls", "--host", "127.0.0.1", "--admin-port", str(free_port()), "--bootstrap-timeout", "5",
         "--initial-peers", f"{honest.info['peer_id']}@{impostor.endpoint}"],
        capture_output=True, text=True, timeout=60,
    )
    assert joining.returncode == 1, joining.stderr
    assert "none of the initial peers answered" in joining.stderr


def test_the_certificate_is_tls_1_3_with_a_p256_key_signed_by_the_identity(peers: tuple[Worker, Worker]) -> None:
    honest, _ = peers
    context = client_ssl_context()
    with socket.create_connection(("127.0.0.1", honest.bulk.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=None) as tls:
        assert tls.version() == "TLSv1.3"
        cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    assert cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == honest.info["peer_id"]
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert cert.signature_algorithm_oid == x509.oid.SignatureAlgorithmOID.ED25519


def test_services_speak_tls_unless_plaintext_is_asked_for() -> None:
    def ping(address: str, *flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*APIARY, "ping", address, "--timeout", "5", *flags], capture_output=True, text=True,
                              timeout=60)

    with ServiceProcesses() as services:
        default = services.start("dht", "--new-swarm").wait_until_up()
        plaintext = services.start("dht", "--new-swarm", "--plaintext").wait_until_up()
        tls_address, plain_address = default.initial_peers, plaintext.initial_peers
        assert ping(tls_address).returncode == 0, ping(tls_address).stderr
        refused = ping(tls_address, "--plaintext")  # the default port speaks TLS only
        assert refused.returncode == 1 and refused.stderr.startswith("apiary: error:"), refused.stderr
        assert ping(plain_address, "--plaintext").returncode == 0
        assert "the port speaks plaintext" in ping(plain_address).stderr  # and the plaintext one no TLS at all

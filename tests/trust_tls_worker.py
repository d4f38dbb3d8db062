"""A TLS peer in its own process, honest or an impostor, for tests/test_trust_tls.py.

    python tests/trust_tls_worker.py --identity PATH               # an RpcServer with TLS (gRPC and bulk)
    python tests/trust_tls_worker.py --identity PATH --forge-as ID # an impostor claiming peer ID

The impostor is what an attacker would run: its own key, a certificate issued in the name of
the victim's peer id (signed by the attacker's key, since it lacks the victim's), a probe that
answers Ping as the victim, and a bulk server presenting the same certificate. Either prints one
JSON line (ports, peer id) and serves until its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
import threading

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from worker_support import die_with_parent, emit

from apiary.wire import PROBE, Identity, RpcServer, WireSettings
from apiary.wire.bulk import BulkAnswer, BulkCall, BulkServer
from apiary.wire.probe import SINK_ROUTE
from apiary.wire.protos.wire_pb2 import PingReply, SinkReply
from apiary.wire.tls import ServerCertificate, identity_name


def forged_certificate(attacker: Identity, victim: str) -> ServerCertificate:
    """A certificate that names `victim` as its issuer and subject, signed by the attacker's key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, victim)]))
        .issuer_name(identity_name(victim))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(victim)]), critical=False)
        .sign(attacker.private_key, None)
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return ServerCertificate(key_pem, cert.public_bytes(serialization.Encoding.PEM))


async def impostor(attacker: Identity, victim: str, settings: WireSettings) -> tuple[int, int, object]:
    certificate = forged_certificate(attacker, victim)

    async def ping(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return PingReply(peer_id=victim).SerializeToString()

    async def sink(call: BulkCall) -> BulkAnswer:
        return BulkAnswer(body=SinkReply(total_bytes=sum(len(p) for _, p in call.tensors)).SerializeToString())

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        PROBE.name, {"Ping": grpc.unary_unary_rpc_method_handler(ping)}),))
    port = server.add_secure_port("127.0.0.1:0", certificate.grpc_credentials())
    await server.start()
    bulk = BulkServer(settings)
    bulk.add_route(SINK_ROUTE, sink)
    await bulk.start(tls=certificate.ssl_context())
    return port, bulk.port, (server, bulk)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--identity", required=True)
    parser.add_argument("--forge-as", help="claim this peer id with a forged certificate")
    args = parser.parse_args()
    die_with_parent()
    identity = Identity.load_or_create(args.identity)
    settings = WireSettings(listen_host="127.0.0.1", tls=True, shutdown_grace=0.2)
    if args.forge_as:
        port, bulk_port, _running = await impostor(identity, args.forge_as, settings)
    else:
        server = RpcServer(settings, identity)
        await server.start()
        assert server.bulk is not None
        port, bulk_port = server.port, server.bulk.port
    emit({"port": port, "bulk_port": bulk_port, "peer_id": identity.peer_id})
    stdin_closed = asyncio.Event()
    loop = asyncio.get_running_loop()
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stdin_closed.set)), daemon=True).start()
    await stdin_closed.wait()


if __name__ == "__main__":
    asyncio.run(main())

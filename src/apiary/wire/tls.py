"""Encrypted links whose server is bound to its peer id.

A server makes a fresh ECDSA P-256 TLS key at every start and a certificate for it that its
identity key signs (X.509 signature algorithm Ed25519), issued in the name of its peer id. A
client that dials `peer_id@host:port` trusts, for that channel only, a trust anchor it makes
itself from the peer id: a CA certificate named after the peer id whose public key is the
identity key inside the peer id. TLS libraries do not check a trust anchor's own signature
(the client signs it with a throw-away key), but they do check that the server's certificate
is signed by the anchor's key, and the handshake proves that the server holds the TLS key of
that certificate. So only the holder of the identity key can answer as that peer id, with no
certificate authority and no first contact; this works with gRPC's standard credentials.

The bulk transport (plain sockets, `ssl` with memory buffers) checks the same binding itself
after the handshake (`certified_peer_id`). A client dialling an address without a peer id
learns the id the server proves (`fetch_peer_id`): the link is encrypted, but whoever holds a
key answers at that address, as in plaintext.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from apiary.wire.address import Endpoint
from apiary.wire.identity import Identity, IdentityError, public_key_from_peer_id

_ORGANIZATION = "apiary peer identity"
_VALID_FOR = datetime.timedelta(days=3650)  # the TLS key lives as long as the process anyway
_CLOCK_MARGIN = datetime.timedelta(days=1)
_ANCHOR_SIGNER = Ed25519PrivateKey.from_private_bytes(bytes(32))  # anchors' own signatures are never checked
_RECORD_BYTES = 256 * 1024


class TlsError(ConnectionError):
    """A TLS peer did not prove the identity it was dialled for."""


@dataclass(frozen=True)
class ServerCertificate:
    """A server's TLS key and its certificate signed by the server's identity (both PEM)."""

    key_pem: bytes
    cert_pem: bytes

    @classmethod
    def for_identity(cls, identity: Identity) -> ServerCertificate:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.peer_id)]))
            .issuer_name(identity_name(identity.peer_id))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_MARGIN)
            .not_valid_after(now + _VALID_FOR)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity.peer_id)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(identity.private_key, None)
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cls(key_pem, cert.public_bytes(serialization.Encoding.PEM))

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)])

    def ssl_context(self) -> ssl.SSLContext:
        """A server context for the bulk transport (TLS 1.3, no session tickets: a connection
        stays silent between requests)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.num_tickets = 0
        with tempfile.TemporaryDirectory(prefix="apiary-tls-") as folder:  # ssl loads keys from files only
            key, cert = Path(folder) / "key.pem", Path(folder) / "cert.pem"
            key.touch(mode=0o600)
            key.write_bytes(self.key_pem)
            cert.write_bytes(self.cert_pem)
            context.load_cert_chain(cert, key)
        return context


def identity_name(peer_id: str) -> x509.Name:
    """The X.509 name of a peer id's identity key: the issuer of its servers' certificates."""
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
                      x509.NameAttribute(NameOID.COMMON_NAME, peer_id)])


@functools.lru_cache(maxsize=4096)
def trust_anchor(peer_id: str) -> bytes:
    """The PEM trust anchor that accepts exactly the servers whose certificate `peer_id`'s key signed."""
    key = Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(peer_id))
    cert = (
        x509.CertificateBuilder()
        .subject_name(identity_name(peer_id))
        .issuer_name(identity_name(peer_id))
        .public_key(key)
        .serial_number(1)
        .not_valid_before(datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc))
        .not_valid_after(datetime.datetime(9999, 12, 31, tzinfo=datetime.timezone.utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(_ANCHOR_SIGNER, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def grpc_channel_credentials(peer_id: str) -> tuple[grpc.ChannelCredentials, list[tuple[str, str]]]:
    """Credentials and channel options of a gRPC channel that only `peer_id` can answer."""
    return (grpc.ssl_channel_credentials(root_certificates=trust_anchor(peer_id)),
            [("grpc.ssl_target_name_override", peer_id)])


def certified_peer_id(der: bytes | None, expected: str | None = None) -> str:
    """The peer id whose identity key signed this server certificate (DER); TlsError if none did,
    or if it is not `expected`. (The handshake has proved the server holds the certificate's key.)"""
    if not der:
        raise TlsError("the server sent no certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
        issuer = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
        peer_id = str(issuer[0].value) if issuer else ""
        Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(peer_id)).verify(
            cert.signature, cert.tbs_certificate_bytes)
    except (ValueError, IdentityError, InvalidSignature) as e:
        reason = str(e) or type(e).__name__
        raise TlsError(f"the server's certificate is not signed by the identity it names: {reason}") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise TlsError(f"the server's certificate is not valid now ({cert.not_valid_before_utc} to {cert.not_valid_after_utc})")
    if expected is not None and peer_id != expected:
        raise TlsError(f"the server proved identity {peer_id}, not {expected}")
    return peer_id


def client_ssl_context() -> ssl.SSLContext:
    """A client context: TLS 1.3, the server's identity checked by `certified_peer_id` (no CA)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])  # gRPC servers insist on it
    return context


async def fetch_peer_id(endpoint: Endpoint, timeout: float) -> str:
    """The peer id that the TLS server at `endpoint` proves (for addresses dialled without one)."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(endpoint.host, endpoint.port, ssl=client_ssl_context(),
                                                      server_hostname="")
    except asyncio.TimeoutError:
        raise TimeoutError(f"no TLS handshake with {endpoint} within {timeout:.1f}s") from None
    try:
        return certified_peer_id(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
    finally:
        writer.close()


class TlsSocket:
    """A TLS session over a non-blocking socket, driven by the event loop through memory buffers
    (so that the bulk transport keeps receiving straight into tensor buffers)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool):
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.session = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side)

    async def handshake(self) -> None:
        while True:
            try:
                self.session.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
        await self._flush()

    def peer_certificate(self) -> bytes | None:
        return self.session.getpeercert(binary_form=True)

    def pending(self) -> bool:
        """Whether received bytes wait to be read (the socket may then be silent)."""
        return bool(self.session.pending() or self._incoming.pending)

    async def recv_into(self, buffer: memoryview) -> int:
        """Reads decrypted bytes into `buffer`; 0 once the peer closed the session."""
        while True:
            try:
                return self.session.read(len(buffer), buffer)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    return 0
            except ssl.SSLZeroReturnError:
                return 0

    async def sendall(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = self.session.write(view[:_RECORD_BYTES])
            view = view[written:]
            await self._flush()

    async def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def _fill(self) -> bool:
        data = await self.loop.sock_recv(self.sock, _RECORD_BYTES)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True


_AGREE = "all peers of a run must agree: --tls, the default, or --plaintext (APIARY_TLS=false)"
_PROBE_SECONDS = 2.0  # how long a failed plaintext call's port is given to show it speaks TLS


def tls_failure(details: str) -> str | None:
    """What a failed TLS handshake means when the other end speaks plaintext (None otherwise)."""
    if "WRONG_VERSION_NUMBER" in details.upper():
        return f"TLS handshake: this process dials with TLS but the port speaks plaintext ({_AGREE})"
    return None


async def plaintext_failure(endpoint: Endpoint, details: str) -> str | None:
    """What a plaintext call's failure means when the server at `endpoint` speaks TLS (None when it
    does not: the failure has another cause). A TLS server closes a plaintext connection at once."""
    lowered = details.lower()
    if "socket closed" not in lowered and "connection reset" not in lowered:
        return None
    try:
        peer_id = await fetch_peer_id(endpoint, _PROBE_SECONDS)
    except (TimeoutError, TlsError, OSError, ssl.SSLError):
        return None
    return f"this process dials in plaintext but peer {peer_id} at {endpoint} speaks TLS ({_AGREE})"

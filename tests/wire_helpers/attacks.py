"""What a hostile stranger sends to a public port, over real sockets: raw HTTP/2 frames (plain or
TLS, as any client may open a TLS session), and the memory it costs the process attacked."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import h2.config
import h2.connection

from apiary.wire import Endpoint

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def open_socket(endpoint: Endpoint, *, tls: bool, source: str | None = None, timeout: float = 5.0) -> socket.socket:
    """A connection to `endpoint` (from the local address `source`, e.g. another loopback address
    to act as another host); with `tls`, a TLS session that proves nothing about the client and
    checks nothing about the server, as an attacker's would."""
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout,
                                    source_address=(source, 0) if source else None)
    if not tls:
        return sock
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    return context.wrap_socket(sock, server_hostname="apiary")


def request_headers(path: bytes) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path), (b":authority", b"apiary"),
            (b"content-type", b"application/grpc"), (b"te", b"trailers")]


def send_request(endpoint: Endpoint, path: bytes, *, tls: bool) -> bytes:
    """Sends one gRPC request with a raw `:path` (any bytes) and an empty body; returns what the
    server answered within a second (b"" if it closed)."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False))
    connection.initiate_connection()
    connection.send_headers(1, request_headers(path), end_stream=True)
    return exchange(endpoint, connection.data_to_send(), tls=tls)


def exchange(endpoint: Endpoint, data: bytes, *, tls: bool) -> bytes:
    """Sends `data` on a fresh connection, then returns what arrives within a second."""
    with open_socket(endpoint, tls=tls) as sock:
        sock.sendall(data)
        sock.settimeout(1.0)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass
        return received


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """One raw HTTP/2 frame."""
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + (stream & 0x7FFFFFFF).to_bytes(4, "big") + payload


def rss_bytes(pid: int) -> int:
    """The resident memory of process `pid`."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")

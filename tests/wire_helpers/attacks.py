"""What a hostile stranger sends to the ports of `apiary` service processes, over real sockets:
raw HTTP/2 (plain or TLS, as any client may open a TLS session), and what the tests check
afterwards: a clean call, the memory the process holds, its metrics."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import httpx
from service_processes import ServiceProcess

from apiary.wire import ChannelPool, Endpoint, PeerAddress, RpcClient, WireError
from apiary.wire.probe import PROBE
from apiary.wire.protos.wire_pb2 import PingRequest

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
    server answered within a moment (b"" if it closed)."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False))
    connection.initiate_connection()
    connection.send_headers(1, request_headers(path), end_stream=True)
    return exchange(endpoint, connection.data_to_send(), tls=tls)


def exchange(endpoint: Endpoint, data: bytes, *, tls: bool) -> bytes:
    """Sends `data` on a fresh connection, then returns what arrives within 0.3 seconds."""
    with open_socket(endpoint, tls=tls) as sock:
        sock.sendall(data)
        sock.settimeout(0.3)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass
        return received


def rss_bytes(pid: int) -> int:
    """The resident memory of process `pid`."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass
class Port:
    """One gRPC port of a service process: public (TLS, peer id known) or local API (plaintext)."""

    service: ServiceProcess
    api: str
    endpoint: Endpoint
    peer_id: str | None

    @property
    def tls(self) -> bool:
        return self.api == "public"

    def __str__(self) -> str:
        return f"{self.service.command} {self.api} {self.endpoint}"


def public_address(service: ServiceProcess) -> PeerAddress:
    """The public gRPC address a service printed."""
    pattern = {"dht": r"--initial-peers (\S+)", "averager": r"peer id (\S+)", "expert-server": r"experts served at: (\S+)"}
    if service.command == "averager":
        peer_id = re.search(r"peer id (\S+)", service.output).group(1)  # type: ignore[union-attr]
        endpoint = re.search(r"public: (\S+) ", service.output).group(1)  # type: ignore[union-attr]
        return PeerAddress.parse(f"{peer_id}@{endpoint}")
    return PeerAddress.parse(re.search(pattern[service.command], service.output).group(1))  # type: ignore[union-attr]


def bulk_endpoint(averager: ServiceProcess) -> Endpoint:
    """The bulk port an averager printed."""
    return Endpoint.parse(re.search(r"\(bulk (\S+)\)", averager.output).group(1))  # type: ignore[union-attr]


def ports(services: dict[str, ServiceProcess]) -> list[Port]:
    """Every gRPC port of `services`: public, and local API where a service has one."""
    found = []
    for service in services.values():
        address = public_address(service)
        found.append(Port(service, "public", address.endpoint, address.peer_id))
        if service.local_api is not None:
            found.append(Port(service, "local", service.local_api, None))
    return found


async def ping(pools: dict[bool, ChannelPool], port: Port, within: float = 10.0) -> None:
    """A clean Ping answered by `port` within `within` seconds (retried while it is refused)."""
    deadline = time.monotonic() + within
    while True:
        try:
            await RpcClient(pools[port.tls], PROBE, port.endpoint, peer_id=port.peer_id).call("Ping", PingRequest(), timeout=3)
            return
        except WireError as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{port} no longer answers: {e}") from None
            await asyncio.sleep(0.2)


def metric(service: ServiceProcess, name: str, labels: str = "") -> float:
    """A sample of the service's /metrics (0 if absent)."""
    prefix = "apiary_" + service.command.replace("-", "_")
    selector = rf"\{{{labels}\}}" if labels else ""
    found = re.search(rf"^{prefix}_{name}{selector} (\S+)$", service.get("/metrics").text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def held_in_flight(service: ServiceProcess, nbytes: int, within: float = 10.0) -> bool:
    """Waits until the service holds `nbytes` of what peers send (its headers were read); False
    if it does not within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):  # a process busy elsewhere may answer late
            if metric(service, "in_flight_bytes") >= nbytes:
                return True
        await asyncio.sleep(0.1)
    return False

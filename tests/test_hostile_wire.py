"""Hostile bytes at real `apiary` service processes, over real sockets and TLS (the default):
after each attack the service answers a clean call, its memory has not grown by more than
100 MB, and `/healthz` tells the truth (docs/hostile-internet.md, sections 1 and 2)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest
from service_processes import ServiceProcess, ServiceProcesses
from wire_helpers.attacks import open_socket, rss_bytes, send_request

from apiary.wire import ChannelPool, Endpoint, PeerAddress, RpcClient, WireError, WireSettings
from apiary.wire.bulk import MAGIC
from apiary.wire.probe import PROBE, SINK_ROUTE
from apiary.wire.protos.wire_pb2 import BulkReply, BulkRequest, PingRequest, SinkRequest, TensorChunk, TensorHeader

MiB, GiB = 1 << 20, 1 << 30
RSS_SLACK = 100 * MiB
STALL_SECONDS = 2.0
BAD_PATH = b"/apiary.wire.Probe/\xff\xfe"


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
    pattern = {"dht": r"--initial-peers (\S+)", "averager": r"peer id (\S+)", "expert-server": r"experts served at: (\S+)"}
    if service.command == "averager":
        peer_id = re.search(r"peer id (\S+)", service.output).group(1)  # type: ignore[union-attr]
        endpoint = re.search(r"public: (\S+) ", service.output).group(1)  # type: ignore[union-attr]
        return PeerAddress.parse(f"{peer_id}@{endpoint}")
    return PeerAddress.parse(re.search(pattern[service.command], service.output).group(1))  # type: ignore[union-attr]


def bulk_endpoint(averager: ServiceProcess) -> Endpoint:
    return Endpoint.parse(re.search(r"\(bulk (\S+)\)", averager.output).group(1))  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def services() -> Iterator[dict[str, ServiceProcess]]:
    with ServiceProcesses() as processes, pytest.MonkeyPatch.context() as env:
        env.setenv("APIARY_STREAM_STALL_TIMEOUT", str(STALL_SECONDS))  # every other limit: the service's default
        dht = processes.start("dht").wait_until_up()
        averager = processes.start("averager", "--run-id", "hostile", "--dht-local", str(dht.local_api))
        experts = processes.start("expert-server", "--experts", "ffn.0.[0:1]", "--hidden-size", "8",
                                  "--dht-local", str(dht.local_api))
        averager.wait_until_up()
        experts.wait_until_up(until="experts served at: ")
        yield {"dht": dht, "averager": averager, "expert-server": experts}


def ports(services: dict[str, ServiceProcess]) -> list[Port]:
    found = []
    for service in services.values():
        address = public_address(service)
        found.append(Port(service, "public", address.endpoint, address.peer_id))
        if service.local_api is not None:
            found.append(Port(service, "local", service.local_api, None))
    return found


@pytest.fixture
async def pools() -> AsyncIterator[dict[bool, ChannelPool]]:
    async with ChannelPool(WireSettings(default_timeout=10)) as tls, \
            ChannelPool(WireSettings(tls=False, default_timeout=10)) as plain:
        yield {True: tls, False: plain}


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


# ---- 1. malformed HTTP/2 ----


async def test_a_path_that_is_not_utf8_leaves_every_grpc_port_serving(
    services: dict[str, ServiceProcess], pools: dict[bool, ChannelPool]
) -> None:
    for port in ports(services):
        await ping(pools, port)
        await asyncio.to_thread(send_request, port.endpoint, BAD_PATH, tls=port.tls)
        await ping(pools, port)  # before the fix: the port refused every connection from here on
        assert port.service.get("/healthz").status_code == 200, port
        restarts = metric(port.service, "grpc_server_restarts_total", f'api="{port.api}"')
        assert restarts >= 1, f"{port}: the restart was not counted"


def hold_port_when_freed(port: int, stop: threading.Event) -> socket.socket | None:
    """Binds `port` the moment its server lets go of it (and keeps it), until `stop`."""
    while not stop.is_set():
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(1)
            return sock
        except OSError:
            sock.close()
            time.sleep(0.001)
    return None


def test_healthz_reports_a_grpc_server_that_stopped_and_cannot_restart() -> None:
    with ServiceProcesses() as processes:
        dht = processes.start("dht").wait_until_up()
        port = public_address(dht).endpoint
        assert dht.get("/healthz").json() == {"status": "ok"}
        stop = threading.Event()
        holder: list[socket.socket | None] = []
        thief = threading.Thread(target=lambda: holder.append(hold_port_when_freed(port.port, stop)), daemon=True)
        thief.start()
        try:
            send_request(port, BAD_PATH, tls=True)  # the server stops, another program takes its port
            deadline = time.monotonic() + 15
            while (answer := dht.get("/healthz")).status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert answer.status_code == 503, answer.text  # before the fix: "ok" while nothing served
            assert "public gRPC server" in answer.json()["problems"][0]
        finally:
            stop.set()
            thief.join(5)
            for sock in holder:
                if sock is not None:
                    sock.close()


# ---- 2. declared sizes, stalled streams, the byte budget ----


def header_of(nbytes: int) -> TensorHeader:
    return TensorHeader(dtype="uint8", shape=[nbytes], nbytes=nbytes)


async def declared_then_silent(nbytes: int, release: asyncio.Event) -> AsyncIterator[TensorChunk]:
    """A tensor stream that declares `nbytes`, sends 3 of them and stays open until `release`."""
    yield TensorChunk(header=header_of(nbytes), data=b"abc")
    await release.wait()


def bulk_request(nbytes: int, payload: bytes) -> bytes:
    frame = BulkRequest(route=SINK_ROUTE, body=SinkRequest().SerializeToString(),
                        tensors=[header_of(nbytes)]).SerializeToString()
    return MAGIC + len(frame).to_bytes(4, "big") + frame + payload


def bulk_reply(sock: socket.socket) -> BulkReply | None:
    """The reply frame on a bulk connection, or None if the server closed it."""
    received = b""
    try:
        while len(received) < 4 or len(received) < 4 + int.from_bytes(received[:4], "big"):
            chunk = sock.recv(65536)
            if not chunk:
                return None
            received += chunk
    except ConnectionError:
        return None
    return BulkReply.FromString(received[4 : 4 + int.from_bytes(received[:4], "big")])


async def trickling(nbytes: int, release: asyncio.Event) -> AsyncIterator[TensorChunk]:
    """A tensor stream that declares `nbytes`, then sends a byte every half second (never stalling)
    until `release`."""
    yield TensorChunk(header=header_of(nbytes), data=b"abc")
    while not release.is_set():
        await asyncio.sleep(0.5)
        yield TensorChunk(data=b"x")


async def test_a_declared_size_costs_only_the_bytes_sent(
    services: dict[str, ServiceProcess], pools: dict[bool, ChannelPool]
) -> None:
    averager = services["averager"]
    public = [port for port in ports(services) if port.api == "public"]
    baseline = {port.service.pid: rss_bytes(port.service.pid) for port in public}
    release = asyncio.Event()
    streams, sockets = [], []
    try:
        for port in public:  # three streams each, declaring 2 GiB, 1 GiB and 1 GiB
            client = RpcClient(pools[True], PROBE, port.endpoint, peer_id=port.peer_id, timeout=60)
            for nbytes in (2 * GiB, GiB, GiB):
                streams.append(asyncio.ensure_future(client.call("Sink", trickling(nbytes, release))))
        for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):  # and the bulk port's Sink route, 1 GiB each
            sock = open_socket(bulk_endpoint(averager), tls=True, source=host)
            sock.sendall(bulk_request(GiB, b"abc"))
            sockets.append(sock)

        async def trickle_bulk() -> None:
            while not release.is_set():
                await asyncio.sleep(0.5)
                for sock in sockets:
                    sock.send(b"x")

        trickler = asyncio.ensure_future(trickle_bulk())
        held = await held_in_flight(averager, 4 * GiB)  # one gRPC stream and the three bulk requests
        for port in public:
            grown = rss_bytes(port.service.pid) - baseline[port.service.pid]
            assert grown < RSS_SLACK, f"{port}: {grown / MiB:.0f} MiB more while strangers declare gigabytes"
            await ping(pools, port)
        assert held, "the averager never held the declared tensors: nothing was measured"
        deadline = time.monotonic() + 10
        while sum(stream.done() for stream in streams) < len(streams) - 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        refused = [stream for stream in streams if stream.done()]
        assert len(refused) == len(streams) - 1  # all but the averager's first GiB: refused at their headers
        # (a client still writing may read grpc's "Internal error from Core" instead of the refusal)
        assert all(isinstance(stream.exception(), WireError) for stream in refused)
    finally:
        release.set()
        await asyncio.gather(*streams, return_exceptions=True)
        for sock in sockets:
            sock.close()
    await trickler
    await asyncio.sleep(0.5)
    for port in public:
        grown = rss_bytes(port.service.pid) - baseline[port.service.pid]
        assert grown < RSS_SLACK, f"{port}: {grown / MiB:.0f} MiB more after the streams ended"
        assert port.service.get("/healthz").status_code == 200


async def test_a_failed_stream_gives_its_memory_back(
    services: dict[str, ServiceProcess], pools: dict[bool, ChannelPool]
) -> None:
    averager = services["averager"]
    port = next(port for port in ports(services) if port.service is averager and port.api == "public")
    await ping(pools, port)
    baseline = rss_bytes(averager.pid)
    nbytes, piece = 300 * MiB, b"\1" * (4 * MiB)

    async def sent_then_overflowing() -> AsyncIterator[TensorChunk]:
        yield TensorChunk(header=header_of(nbytes), data=piece)
        for _ in range(nbytes // len(piece) - 2):
            yield TensorChunk(data=piece)
        yield TensorChunk(data=piece * 2)  # past the declared end: the call fails with 296 MiB received

    with pytest.raises(WireError, match="more than the"):
        await RpcClient(pools[True], PROBE, port.endpoint, peer_id=port.peer_id, timeout=60).call(
            "Sink", sent_then_overflowing())
    await asyncio.sleep(0.5)
    grown = rss_bytes(averager.pid) - baseline
    assert grown < RSS_SLACK, f"{grown / MiB:.0f} MiB of the failed stream still held"  # before: the whole tensor
    await ping(pools, port)


async def test_a_stalled_stream_is_cut_off_and_gives_its_bytes_back(
    services: dict[str, ServiceProcess], pools: dict[bool, ChannelPool]
) -> None:
    averager = services["averager"]
    port = next(port for port in ports(services) if port.service is averager and port.api == "public")
    client = RpcClient(pools[True], PROBE, port.endpoint, peer_id=port.peer_id, timeout=3 * STALL_SECONDS + 5)
    started = time.monotonic()
    with pytest.raises(WireError, match=f"stream_stall_timeout={STALL_SECONDS:g}"):
        await client.call("Sink", declared_then_silent(GiB, asyncio.Event()))
    assert time.monotonic() - started < 2 * STALL_SECONDS + 2

    with open_socket(bulk_endpoint(averager), tls=True, timeout=3 * STALL_SECONDS + 5) as sock:
        sock.sendall(bulk_request(GiB, b"abc"))
        started = time.monotonic()
        assert await asyncio.to_thread(bulk_reply, sock) is None  # closed on the staller
        assert time.monotonic() - started < 2 * STALL_SECONDS + 2
    assert metric(averager, "rpc_rejected_total", 'reason="stalled"') >= 2
    assert metric(averager, "in_flight_bytes") == 0
    release = asyncio.Event()  # its whole share is free again: a full-size tensor's worth is admitted
    held = asyncio.ensure_future(client.call("Sink", declared_then_silent(GiB, release)))
    assert await held_in_flight(averager, GiB), held
    release.set()
    with pytest.raises(WireError, match="ended after 3 of"):
        await held


async def test_one_peer_cannot_hold_the_whole_byte_budget(
    services: dict[str, ServiceProcess], pools: dict[bool, ChannelPool]
) -> None:
    averager = services["averager"]
    port = next(port for port in ports(services) if port.service is averager and port.api == "public")
    client = RpcClient(pools[True], PROBE, port.endpoint, peer_id=port.peer_id, timeout=30)
    release = asyncio.Event()
    held = asyncio.ensure_future(client.call("Sink", declared_then_silent(GiB, release)))  # 127.0.0.1: its share
    try:
        assert await held_in_flight(averager, GiB), held
        with pytest.raises(WireError, match="max_bytes_in_flight_per_peer"):
            await client.call("Sink", declared_then_silent(MiB, asyncio.Event()))
        payload = bytes(range(256)) * 4096  # 1 MiB from another host still fits
        with open_socket(bulk_endpoint(averager), tls=True, source="127.0.0.2") as sock:
            sock.sendall(bulk_request(len(payload), payload))
            reply = await asyncio.to_thread(bulk_reply, sock)
        assert reply is not None and reply.code == 0, reply
    finally:
        release.set()
        await asyncio.gather(held, return_exceptions=True)

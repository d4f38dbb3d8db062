"""Declared sizes, stalled streams and the byte budget, at real `apiary` service processes over
real sockets and TLS (the default), each service with its default limits: after each attack the
service answers a clean call and its memory has not grown by more than 100 MB
(docs/hostile-internet.md, section 2)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from service_processes import ServiceProcess, ServiceProcesses
from wire_helpers.attacks import bulk_endpoint, held_in_flight, metric, open_socket, ping, ports, rss_bytes

from apiary.wire import ChannelPool, RpcClient, WireError, WireSettings
from apiary.wire.framing import MAGIC
from apiary.wire.probe import PROBE, SINK_ROUTE
from apiary.wire.protos.wire_pb2 import BulkReply, BulkRequest, SinkRequest, TensorChunk, TensorHeader

MiB, GiB = 1 << 20, 1 << 30
RSS_SLACK = 100 * MiB
STALL_SECONDS = 2.0


@pytest.fixture(scope="module")
def services() -> Iterator[dict[str, ServiceProcess]]:
    with ServiceProcesses() as processes, pytest.MonkeyPatch.context() as env:
        env.setenv("APIARY_STREAM_STALL_TIMEOUT", str(STALL_SECONDS))  # every other limit: the service's default
        dht = processes.start("dht", "--new-swarm").wait_until_up()
        averager = processes.start("averager", "--run-id", "hostile", "--dht-local", str(dht.local_api))
        averager.wait_until_up()
        yield {"dht": dht, "averager": averager}


@pytest.fixture
async def pools() -> AsyncIterator[dict[bool, ChannelPool]]:
    async with ChannelPool(WireSettings(default_timeout=10)) as tls, \
            ChannelPool(WireSettings(tls=False, default_timeout=10)) as plain:
        yield {True: tls, False: plain}


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
            print(f"{port}: {grown / MiB:+.0f} MiB resident while strangers declare gigabytes")
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
        print(f"{port}: {grown / MiB:+.0f} MiB resident after the streams ended")
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
    print(f"averager: {grown / MiB:+.0f} MiB resident after a stream failed 296 MiB into its tensor")
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
    print(f"averager: a silent gRPC stream cut off after {time.monotonic() - started:.1f}s")
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

"""Per-peer limits on every public RPC (`apiary.wire.limits`): request rates, calls in flight,
bulk connections, bytes in flight. A refused request gets RESOURCE_EXHAUSTED naming the limit
and is counted in `<prefix>_rpc_rejected_total{reason}`; the server keeps serving others.

The flood test states the bound: while one peer floods a server (limited to 20 requests/s and 4
calls in flight per peer) with 1 MiB Sink streams from 16 concurrent loops, another peer's Pings
and small Sinks all succeed, and their median latency stays below 5x their median without the
flood plus 25 ms. (Without limits, the same flood raised it from ~2 ms to ~100 ms here.)"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest
import torch
from prometheus_client import CollectorRegistry
from wire_helpers.tensors import as_stream

from apiary.wire import PROBE, ChannelPool, Endpoint, Identity, OverLimit, RpcClient, RpcServer, WireSettings
from apiary.wire.bulk import BulkClient
from apiary.wire.framing import MAGIC
from apiary.wire.limits import LimitExceeded, ServerLimits, peer_key
from apiary.wire.probe import SINK_ROUTE
from apiary.wire.protos.wire_pb2 import PingRequest, SinkRequest, TensorChunk, TensorHeader
from apiary.wire.settings import default_route_address
from apiary.wire.tensors import tensor_payload, tensors_to_chunks

RATE = 20  # requests per second each peer may make in the flood test
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


def rejected(registry: CollectorRegistry, reason: str) -> float:
    return registry.get_sample_value("apiary_test_rpc_rejected_total", {"reason": reason}) or 0.0


async def started(settings: WireSettings) -> tuple[RpcServer, CollectorRegistry]:
    registry = CollectorRegistry()
    server = RpcServer(settings, Identity.generate(), registry=registry, metrics_prefix="apiary_test")
    await server.start()
    return server, registry


async def ping(pool: ChannelPool, endpoint: Endpoint) -> None:
    await RpcClient(pool, PROBE, endpoint).call("Ping", PingRequest(), timeout=10)


def test_peer_key_is_the_host_of_the_transport_address() -> None:
    assert peer_key("ipv4:10.1.2.3:5678") == "10.1.2.3"
    assert peer_key("ipv6:%5B::1%5D:5678") == "::1"
    assert peer_key("ipv6:[fd00::2]:80") == "fd00::2"
    assert peer_key("10.1.2.3:5678") == "10.1.2.3"


def test_token_bucket_and_concurrency_per_peer() -> None:
    limits = ServerLimits(WireSettings(max_requests_per_second=10, request_burst=3, max_concurrent_per_peer=2))
    first, second = limits.admit("a"), limits.admit("a")
    with pytest.raises(LimitExceeded, match="max_concurrent_per_peer=2"):
        limits.admit("a")
    first()
    limits.admit("a")()  # the third token of the burst
    with pytest.raises(LimitExceeded, match="max_requests_per_second=10"):
        limits.admit("a")
    limits.admit("b")()  # another peer has its own bucket
    time.sleep(0.15)  # 10/s refills one token
    limits.admit("a")()
    second()
    assert limits.rejected == {"rate": 1, "concurrency": 1, "connections": 0, "bytes_in_flight": 0, "peers": 0,
                               "stalled": 0}


def test_tracked_peers_are_bounded() -> None:
    limits = ServerLimits(WireSettings(max_tracked_peers=2))
    busy = limits.admit("a")
    limits.admit("b")()
    limits.admit("c")()  # "b" (idle, least recently seen) is forgotten
    assert set(limits._peers) == {"a", "c"}
    in_flight = limits.admit("c")
    with pytest.raises(LimitExceeded, match="max_tracked_peers=2"):
        limits.admit("d")  # every tracked peer is busy
    busy()
    in_flight()


def test_budget_settings_must_hold_a_tensor() -> None:
    with pytest.raises(ValueError, match="max_bytes_in_flight"):
        WireSettings(max_tensor_bytes=2 * MiB, max_bytes_in_flight=MiB)


async def test_rate_limit_refuses_with_resource_exhausted_and_counts() -> None:
    server, registry = await started(WireSettings(listen_host="127.0.0.1", max_requests_per_second=1, request_burst=5))
    try:
        async with ChannelPool() as pool:
            for _ in range(5):
                await ping(pool, server.local_endpoint)
            with pytest.raises(OverLimit, match="RESOURCE_EXHAUSTED.*max_requests_per_second=1") as raised:
                await ping(pool, server.local_endpoint)
            assert raised.value.code is not None and raised.value.code.name == "RESOURCE_EXHAUSTED"
        assert rejected(registry, "rate") == 1
        assert registry.get_sample_value("apiary_test_rpc_requests_total",
                                         {"method": "Ping", "code": "RESOURCE_EXHAUSTED"}) == 1
    finally:
        await server.stop(0)


async def slow_stream(header: TensorHeader, first: bytes, release: asyncio.Event) -> AsyncIterator[TensorChunk]:
    yield TensorChunk(header=header, data=first)
    await release.wait()
    yield TensorChunk(data=b"\0" * (header.nbytes - len(first)))


async def test_concurrent_streams_share_the_budget_of_bytes_in_flight() -> None:
    server, registry = await started(WireSettings(listen_host="127.0.0.1", max_tensor_bytes=4 * MiB,
                                                  max_bytes_in_flight=6 * MiB))
    try:
        header = TensorHeader(dtype="uint8", shape=[4 * MiB], nbytes=4 * MiB)
        async with ChannelPool() as pool:
            client = RpcClient(pool, PROBE, server.local_endpoint)
            release = asyncio.Event()
            first = asyncio.ensure_future(client.call("Sink", slow_stream(header, b"\0" * 1024, release), timeout=20))
            while server.limits.bytes_in_flight.used < 4 * MiB:  # the first stream holds its tensor's bytes
                await asyncio.sleep(0.01)
            with pytest.raises(OverLimit, match="max_bytes_in_flight=6291456"):
                await client.call("Sink", slow_stream(header, b"", asyncio.Event()), timeout=20)
            release.set()
            assert (await first).total_bytes == 4 * MiB
            await asyncio.sleep(0.1)
            assert server.limits.bytes_in_flight.used == 0  # given back when the stream ended

            aborted = asyncio.ensure_future(client.call("Sink", slow_stream(header, b"\0", asyncio.Event()), timeout=20))
            while server.limits.bytes_in_flight.used == 0:
                await asyncio.sleep(0.01)
            aborted.cancel()  # the caller gives up mid-tensor
            deadline = time.monotonic() + 5
            while server.limits.bytes_in_flight.used and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert server.limits.bytes_in_flight.used == 0
            await ping(pool, server.local_endpoint)
        assert rejected(registry, "bytes_in_flight") == 1
    finally:
        await server.stop(0)


async def test_bulk_requests_beyond_the_budget_are_refused_before_allocating() -> None:
    server, registry = await started(WireSettings(listen_host="127.0.0.1", max_tensor_bytes=4 * MiB,
                                                  max_bytes_in_flight=4 * MiB))
    assert server.bulk is not None
    endpoint = Endpoint("127.0.0.1", server.bulk.port)
    client = BulkClient(WireSettings(default_timeout=10))
    try:
        fits = torch.zeros(3 * MiB, dtype=torch.uint8)
        body = SinkRequest().SerializeToString()
        reply, _ = await client.call(endpoint, SINK_ROUTE, body=body, tensors=[tensor_payload(fits)] * 1)
        two = [tensor_payload(fits), tensor_payload(fits)]  # 6 MiB in one request: more than the budget
        with pytest.raises(OverLimit, match="max_bytes_in_flight=4194304"):
            await client.call(endpoint, SINK_ROUTE, body=body, tensors=two)
        await client.call(endpoint, SINK_ROUTE, body=body, tensors=[tensor_payload(fits)])  # still serving
        assert rejected(registry, "bytes_in_flight") == 1
        assert server.limits.bytes_in_flight.used == 3 * MiB  # the connection's reused buffer, until it closes
    finally:
        await client.close()
        await server.stop(0)


async def test_bulk_connections_per_peer_are_capped() -> None:
    server, registry = await started(WireSettings(listen_host="127.0.0.1", max_bulk_connections_per_peer=3))
    assert server.bulk is not None
    loop = asyncio.get_running_loop()
    sockets = []
    try:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", server.bulk.port), timeout=5)
            sock.sendall(MAGIC)
            sockets.append(sock)
        extra = socket.create_connection(("127.0.0.1", server.bulk.port), timeout=5)
        sockets.append(extra)
        answer = await loop.run_in_executor(None, extra.recv, 4096)
        assert b"max_bulk_connections_per_peer=3" in answer
        assert rejected(registry, "connections") == 1
        for sock in sockets[:1]:
            sock.close()
        await asyncio.sleep(0.2)
        client = BulkClient(WireSettings(default_timeout=10))  # a freed place serves a new connection
        try:
            await client.call(Endpoint("127.0.0.1", server.bulk.port), SINK_ROUTE,
                              body=SinkRequest().SerializeToString(), tensors=[tensor_payload(torch.ones(4))])
        finally:
            await client.close()
    finally:
        for sock in sockets:
            sock.close()
        await server.stop(0)


def two_local_hosts() -> tuple[str, str, str] | None:
    """A listen host and two addresses of this machine that a server sees as different peers."""
    other = default_route_address()
    if not other.startswith("127."):
        return "0.0.0.0", "127.0.0.1", other
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return "::", "127.0.0.1", "::1"
    except OSError:
        return None


async def latencies(pool: ChannelPool, endpoint: Endpoint, seconds: float) -> list[float]:
    """Pings and small Sinks, alternating, at about 25 calls per second; every one must succeed."""
    client = RpcClient(pool, PROBE, endpoint)
    small = list(tensors_to_chunks([torch.ones(16 * 1024)], MiB))
    measured = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started_at = time.perf_counter()
        if len(measured) % 2:
            await client.call("Sink", as_stream(small), timeout=10)
        else:
            await client.call("Ping", PingRequest(), timeout=10)
        measured.append(time.perf_counter() - started_at)
        await asyncio.sleep(0.04)
    return measured


@pytest.mark.timeout(90)
async def test_a_flooding_peer_does_not_slow_the_others_beyond_the_bound() -> None:
    hosts = two_local_hosts()
    if hosts is None:
        pytest.skip("needs two local addresses a server tells apart (a non-loopback IPv4 address or ::1)")
    listen, honest_host, flooder_host = hosts
    server, registry = await started(WireSettings(listen_host=listen, max_requests_per_second=RATE, request_burst=RATE,
                                                  max_concurrent_per_peer=4))
    flooder = None
    try:
        async with ChannelPool() as pool:
            honest = Endpoint(honest_host, server.port)
            await latencies(pool, honest, 0.5)  # warm up the channel
            quiet = await latencies(pool, honest, 3.0)
            flooder = subprocess.Popen(
                [sys.executable, "-m", "tests.trust_flood_worker", "--target", str(Endpoint(flooder_host, server.port)),
                 "--seconds", "6", "--concurrency", "16", "--tensor-bytes", str(MiB)],
                cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env={**os.environ, "PYTHONPATH": f"{REPO_ROOT}/src{os.pathsep}{REPO_ROOT}/tests"},
            )
            assert flooder.stdout is not None
            line = await asyncio.get_running_loop().run_in_executor(None, flooder.stdout.readline)
            assert json.loads(line)["event"] == "started", flooder.stderr.read() if flooder.stderr else ""
            flooded = await latencies(pool, honest, 3.0)
            out, err = await asyncio.get_running_loop().run_in_executor(None, flooder.communicate, None, 30)
        report = json.loads(out.strip().splitlines()[-1])
        quiet_median, flooded_median = statistics.median(quiet), statistics.median(flooded)
        print(f"honest median latency: {quiet_median * 1e3:.1f} ms quiet, {flooded_median * 1e3:.1f} ms under flood; "
              f"flooder: {report['ok']} served, {report['rejected']} refused, {report['cut']} cut off")
        assert report["other"] == 0, report["other_details"]
        assert report["rejected"] > report["ok"]  # the flood was mostly refused...
        assert report["ok"] <= RATE * 7 + RATE  # ...and what was served stayed within rate x time + burst
        assert f"max_requests_per_second={RATE}" in report["rejected_details"] or \
            "max_concurrent_per_peer=4" in report["rejected_details"]
        assert rejected(registry, "rate") + rejected(registry, "concurrency") >= report["rejected"]
        assert flooded_median <= 5 * quiet_median + 0.025
    finally:
        if flooder is not None and flooder.poll() is None:
            flooder.kill()
            flooder.wait(5)
        await server.stop(0)

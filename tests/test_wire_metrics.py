"""Prometheus metrics of an RpcServer: calls counted by method and status code, durations observed."""

# Plaintext here, asked for explicitly: these tests open raw channels and sockets to check the
# wire's own mechanics; the same paths over TLS (the default) are covered by test_trust_tls.py.

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from wire_helpers.services import TROUBLE, Trouble, eventually

from apiary.wire import PROBE, ChannelPool, Endpoint, Identity, RemoteFailure, RpcClient, RpcServer, WireSettings
from apiary.wire.bulk import BulkClient
from apiary.wire.probe import SINK_ROUTE
from apiary.wire.protos.wire_pb2 import PingRequest, SinkRequest
from apiary.wire.tensors import tensor_payload


@pytest.fixture
async def served() -> AsyncIterator[tuple[RpcServer, CollectorRegistry]]:
    registry = CollectorRegistry()
    server = RpcServer(WireSettings(tls=False, listen_host="127.0.0.1"), Identity.generate(), registry=registry,
                       metrics_prefix="apiary_test")
    server.add_service(TROUBLE, Trouble())
    await server.start()
    yield server, registry
    await server.stop(0)


def requests(registry: CollectorRegistry, method: str, code: str) -> float:
    return registry.get_sample_value("apiary_test_rpc_requests_total", {"method": method, "code": code}) or 0.0


async def test_calls_are_counted_by_method_and_code(served: tuple[RpcServer, CollectorRegistry]) -> None:
    server, registry = served
    async with ChannelPool(WireSettings(tls=False, default_timeout=10)) as pool:
        probe = RpcClient(pool, PROBE, server.local_endpoint)
        pings = [PingRequest() for _ in range(3)]
        answers = [await probe.call("Ping", ping) for ping in pings]
        raw_ping = pool.channel(server.local_endpoint).unary_unary("/apiary.wire.Probe/Ping")
        with pytest.raises(grpc.aio.AioRpcError):
            await raw_ping(b"\xff\xff", timeout=10)
        with pytest.raises(RemoteFailure):
            await RpcClient(pool, TROUBLE, server.local_endpoint).call("Crash", PingRequest())

    # a failed call is recorded just after its caller got the error
    await eventually(
        lambda: requests(registry, "Crash", "INTERNAL") == 1 and requests(registry, "Ping", "INVALID_ARGUMENT") == 1
    )
    assert requests(registry, "Ping", "OK") == 3
    assert requests(registry, "Ping", "INVALID_ARGUMENT") == 1
    assert requests(registry, "Crash", "INTERNAL") == 1
    assert requests(registry, "Sleep", "OK") == 0
    assert registry.get_sample_value("apiary_test_rpc_duration_seconds_count", {"method": "Ping"}) == 4
    assert registry.get_sample_value("apiary_test_rpc_duration_seconds_sum", {"method": "Ping"}) > 0
    assert registry.get_sample_value("apiary_test_rpc_duration_seconds_bucket", {"method": "Ping", "le": "+Inf"}) == 4
    # the bytes of the messages, as serialized (an empty Ping: none), the malformed request's two counted too
    assert registry.get_sample_value("apiary_test_rpc_received_bytes_total", {"method": "Ping"}) == \
        sum(len(ping.SerializeToString()) for ping in pings) + 2
    assert registry.get_sample_value("apiary_test_rpc_sent_bytes_total", {"method": "Ping"}) == \
        sum(len(answer.SerializeToString()) for answer in answers) > 0
    exposition = generate_latest(registry).decode()
    assert "# TYPE apiary_test_rpc_requests_total counter" in exposition
    assert "# TYPE apiary_test_rpc_duration_seconds histogram" in exposition


async def test_bulk_routes_are_counted_too(served: tuple[RpcServer, CollectorRegistry]) -> None:
    server, registry = served
    assert server.bulk is not None
    client = BulkClient(WireSettings(tls=False, default_timeout=10))
    try:
        await client.call(Endpoint("127.0.0.1", server.bulk.port), SINK_ROUTE,
                          body=SinkRequest().SerializeToString(), tensors=[tensor_payload(torch.ones(3))])
    finally:
        await client.close()
    assert requests(registry, SINK_ROUTE, "OK") == 1
    assert registry.get_sample_value("apiary_test_rpc_duration_seconds_count", {"method": SINK_ROUTE}) == 1


async def test_without_a_registry_nothing_is_registered() -> None:
    server = RpcServer(WireSettings(tls=False, listen_host="127.0.0.1", bulk=False), Identity.generate())
    assert server.metrics is None
    await server.start()
    try:
        async with ChannelPool(WireSettings(tls=False)) as pool:
            assert (await RpcClient(pool, PROBE, server.local_endpoint).call("Ping", PingRequest(), timeout=5)).peer_id
    finally:
        await server.stop(0)

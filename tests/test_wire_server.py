"""RpcServer lifecycle: binding, announcing, stopping with nothing left behind."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest
from wire_helpers.peers import PeerProcess
from wire_helpers.services import TROUBLE, Trouble, unused_port

import apiary
from apiary.wire import (
    PROBE,
    ChannelPool,
    Endpoint,
    Identity,
    PeerAddress,
    PeerUnavailable,
    RpcClient,
    RpcServer,
    WireSettings,
)
from apiary.wire.bulk import BulkClient
from apiary.wire.probe import SINK_ROUTE
from apiary.wire.protos.wire_pb2 import PingReply, PingRequest, SinkRequest


def local(**overrides: object) -> WireSettings:
    return WireSettings(listen_host="127.0.0.1", **overrides)  # type: ignore[arg-type]


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


async def ping(endpoint: Endpoint) -> PingReply:
    async with ChannelPool() as pool:
        return await RpcClient(pool, PROBE, endpoint).call("Ping", PingRequest(), timeout=10)


async def test_two_servers_cannot_bind_the_same_port() -> None:
    first = RpcServer(local(), Identity.generate())
    await first.start()
    try:
        assert first.bulk is not None
        free_bulk_port, free_port = unused_port(), unused_port()

        second = RpcServer(local(port=first.port, bulk_port=free_bulk_port), Identity.generate())
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{first.port}"):
            await second.start()
        assert refuses_connections(free_bulk_port)  # the failed start let go of what it had bound

        third = RpcServer(local(port=free_port, bulk_port=first.bulk.port), Identity.generate())
        with pytest.raises(OSError, match=f"bulk transfers on 127.0.0.1:{first.bulk.port}"):
            await third.start()
        assert refuses_connections(free_port)
        await third.stop(0)  # harmless after a failed start

        assert (await ping(first.local_endpoint)).peer_id == first.identity.peer_id  # the first is unaffected
    finally:
        await first.stop(0)


async def test_ping_reports_who_answers_and_where() -> None:
    identity = Identity.generate()
    server = RpcServer(local(), identity)
    await server.start()
    try:
        before = time.time()
        reply = await ping(server.local_endpoint)
        assert server.bulk is not None
        assert reply.peer_id == identity.peer_id
        assert reply.announced_address == f"{identity.peer_id}@127.0.0.1:{server.port}"
        assert PeerAddress.parse(reply.announced_address) == PeerAddress(server.local_endpoint, identity.peer_id)
        assert reply.bulk_address == f"127.0.0.1:{server.bulk.port}"
        assert Endpoint.parse(reply.bulk_address) == server.announced_bulk
        assert reply.version == apiary.__version__
        assert before - 5 < reply.server_time < time.time() + 5
    finally:
        await server.stop(0)


async def test_ping_reports_the_announced_address_not_the_bound_one() -> None:
    identity = Identity.generate()
    settings = local(announce_host="peer7.example.org", announce_port=4444, announce_bulk_port=5555)
    server = RpcServer(settings, identity)
    await server.start()
    try:
        reply = await ping(server.local_endpoint)
        assert reply.announced_address == f"{identity.peer_id}@peer7.example.org:4444"
        assert reply.bulk_address == "peer7.example.org:5555"
    finally:
        await server.stop(0)
    no_bulk = RpcServer(local(bulk=False), identity)
    await no_bulk.start()
    try:
        assert (await ping(no_bulk.local_endpoint)).bulk_address == ""
    finally:
        await no_bulk.stop(0)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this host")
async def test_serving_on_ipv6_loopback() -> None:
    server = RpcServer(WireSettings(listen_host="::1"), Identity.generate())
    await server.start()
    try:
        endpoint = Endpoint.parse(f"[::1]:{server.port}")
        reply = await ping(endpoint)
        assert reply.announced_address.endswith(f"@[::1]:{server.port}")
        bulk = BulkClient()
        try:
            body, _ = await bulk.call(Endpoint.parse(reply.bulk_address), SINK_ROUTE,
                                      body=SinkRequest().SerializeToString(), timeout=10)
        finally:
            await bulk.close()
        assert body == b""  # an empty SinkReply: no tensors sent
    finally:
        await server.stop(0)


async def test_stop_leaves_no_task_and_closes_both_ports() -> None:
    tasks_before = asyncio.all_tasks()
    trouble = Trouble()
    server = RpcServer(local(shutdown_grace=0.3), Identity.generate())
    server.add_service(TROUBLE, trouble)
    await server.start()
    assert server.bulk is not None
    port, bulk_port = server.port, server.bulk.port

    pool = ChannelPool(WireSettings(default_timeout=20))
    bulk = BulkClient()
    try:
        await RpcClient(pool, PROBE, server.local_endpoint).call("Ping", PingRequest())
        # an idle bulk connection stays open on the server side (a task serving it) ...
        await bulk.call(Endpoint("127.0.0.1", bulk_port), SINK_ROUTE, body=SinkRequest().SerializeToString())
        # ... and a call is in flight when the server stops
        in_flight = asyncio.ensure_future(RpcClient(pool, TROUBLE, server.local_endpoint).call("Sleep", PingRequest()))
        await asyncio.wait_for(trouble.sleep_started.wait(), 10)

        started = time.monotonic()
        await asyncio.wait_for(server.stop(), 10)  # settings.shutdown_grace = 0.3 s
        assert time.monotonic() - started < 5
        with pytest.raises(PeerUnavailable):  # "try another peer"
            await asyncio.wait_for(in_flight, 10)
        assert trouble.sleep_cancelled.is_set()
        await asyncio.sleep(0)  # let done callbacks run
        left = {task for task in asyncio.all_tasks() - tasks_before if task is not asyncio.current_task()}
        assert not left, f"tasks left after stop(): {left}"

        assert refuses_connections(port)
        assert refuses_connections(bulk_port)
        with pytest.raises(PeerUnavailable):
            await RpcClient(pool, PROBE, Endpoint("127.0.0.1", port)).call("Ping", PingRequest(), timeout=10)
    finally:
        await bulk.close()
        await pool.close()
        await server.stop(0)  # stopping twice is harmless


async def test_a_restarted_server_rebinds_its_fixed_ports_at_once() -> None:
    """A peer restarted with the same configured ports (a container, a systemd unit) must bind them
    again at once, although the connections it closed at stop are still in TIME_WAIT."""
    port, bulk_port = unused_port(), unused_port()
    for _ in range(3):
        server = RpcServer(local(port=port, bulk_port=bulk_port), Identity.generate())
        await server.start()  # raised OSError "address already in use" before the fix
        assert (server.port, server.announced_bulk) == (port, Endpoint("127.0.0.1", bulk_port))
        bulk = BulkClient()
        async with ChannelPool() as pool:
            reply = await RpcClient(pool, PROBE, Endpoint("127.0.0.1", port)).call("Ping", PingRequest(), timeout=10)
            assert reply.peer_id == server.identity.peer_id
            await bulk.call(Endpoint("127.0.0.1", bulk_port), SINK_ROUTE, timeout=10)
            await server.stop(0)  # the server closes the connections still open: TIME_WAIT on its side
        await bulk.close()


async def test_a_crashed_peer_restarted_on_its_ports_is_reachable_with_the_same_id(tmp_path: Path) -> None:
    """A peer process is killed (SIGKILL) and restarted with the same identity file and ports:
    the same clients (a channel pool and a bulk client with a pooled connection) reach it again at
    once, and it answers with the same peer id."""
    identity_file = tmp_path / "identity.pem"
    port, bulk_port = unused_port(), unused_port()
    args = ["--identity", str(identity_file), "--port", str(port), "--bulk-port", str(bulk_port), "--tls"]
    pool, bulk = ChannelPool(WireSettings(default_timeout=10)), BulkClient(WireSettings(default_timeout=10))
    seen = []
    try:
        for round_ in range(2):
            peer = PeerProcess(args).start()
            try:
                assert peer.endpoint == Endpoint("127.0.0.1", port)
                assert peer.bulk_endpoint == Endpoint("127.0.0.1", bulk_port)
                reply = await RpcClient(pool, PROBE, peer.endpoint, peer_id=peer.peer_id).call("Ping", PingRequest())
                body, _ = await bulk.call(peer.bulk_endpoint, SINK_ROUTE, body=SinkRequest().SerializeToString(),
                                          peer_id=peer.peer_id)
                assert body == b""
                seen.append((peer.pid, reply.peer_id, peer.peer_id))
            finally:
                if round_ == 0:
                    peer.crash()
                else:
                    peer.stop()
            assert not peer.alive()
    finally:
        await bulk.close()
        await pool.close()
    (first_pid, first_id, reported), (second_pid, second_id, _) = seen
    assert first_pid != second_pid
    assert first_id == second_id == reported == Identity.load(identity_file).peer_id


async def test_an_idle_bulk_connection_is_closed_by_the_server() -> None:
    """A connection that carries no request for bulk_idle_timeout seconds is closed, so idle
    peers cannot pin the server's tasks and buffers; the client then dials a fresh one."""
    import asyncio as _asyncio

    from apiary.wire import Identity, RpcServer, WireSettings
    from apiary.wire.bulk import BulkClient
    from apiary.wire.probe import SINK_ROUTE
    from apiary.wire.protos.wire_pb2 import TensorHeader

    settings = WireSettings(listen_host="127.0.0.1", bulk_idle_timeout=0.3)
    server = RpcServer(settings, Identity.generate())
    await server.start()
    client = BulkClient(settings)
    payload = memoryview(bytearray(1024))
    header = TensorHeader(dtype="uint8", shape=[1024], nbytes=1024)
    try:
        await client.call(server.announced_bulk, SINK_ROUTE, tensors=[(header, payload)])
        assert len(server.bulk._tasks) == 2  # the accept loop and the connection
        await _asyncio.sleep(0.8)
        assert len(server.bulk._tasks) == 1  # the connection was closed
        await client.call(server.announced_bulk, SINK_ROUTE, tensors=[(header, payload)])
    finally:
        await client.close()
        await server.stop()

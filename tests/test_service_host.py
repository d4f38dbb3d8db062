"""The process skeleton every service runs on: identity, gRPC, admin endpoints, shutdown."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
from prometheus_client.parser import text_string_to_metric_families

from apiary.services.host import ServiceHost, ServiceSettings
from apiary.services.records import RecordPublisher
from apiary.wire import PROBE, ChannelPool, Identity, RpcClient, WireSettings
from apiary.wire.protos.wire_pb2 import PingRequest

LOCAL = WireSettings(listen_host="127.0.0.1")


async def test_admin_endpoints_describe_the_running_service() -> None:
    host = ServiceHost("peer", LOCAL, ServiceSettings(), status=lambda: {"neighbours": 0})
    await host.start()
    try:
        async with ChannelPool(LOCAL) as pool:
            reply = await RpcClient(pool, PROBE, host.server.local_endpoint).call("Ping", PingRequest())
        assert reply.peer_id == host.identity.peer_id
        async with httpx.AsyncClient(base_url=host.admin.url, timeout=5) as http:
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/readyz")).json() == {"ready": True}
            status = (await http.get("/status")).json()
            assert status["service"] == "peer"
            assert status["peer_id"] == host.identity.peer_id
            assert status["address"] == f"{host.identity.peer_id}@127.0.0.1:{host.server.port}"
            assert status["neighbours"] == 0
            families = {f.name: f for f in text_string_to_metric_families((await http.get("/metrics")).text)}
        pings = [s for s in families["apiary_peer_rpc_requests"].samples
                 if s.name.endswith("_total") and s.labels == {"method": "Ping", "code": "OK"}]
        assert pings and pings[0].value == 1
    finally:
        await host.shutdown()


async def test_shutdown_cancels_background_tasks_and_frees_the_ports() -> None:
    host = ServiceHost("peer", LOCAL, ServiceSettings())
    await host.start()
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    host.spawn(forever(), "forever")
    port, admin_port = host.server.port, host.admin.port
    before = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
    await host.run(duration=0.2)
    assert cancelled.is_set()
    left = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} - before
    assert not [t for t in before if not t.done() and t.get_name().startswith("peer:")]
    assert not left
    for p in (port, admin_port):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", p)
        except OSError:
            continue
        writer.close()
        raise AssertionError(f"port {p} still accepts connections after shutdown")


async def test_a_failing_background_task_stops_the_service() -> None:
    host = ServiceHost("peer", LOCAL, ServiceSettings())
    await host.start()

    async def broken() -> None:
        raise RuntimeError("lost the database")

    host.spawn(broken(), "broken")
    await asyncio.wait_for(host.run(), timeout=10)


def test_a_restarted_service_keeps_its_peer_id(tmp_path) -> None:
    identity = tmp_path / "id" / "peer.key"
    script = (
        "import asyncio\n"
        "from apiary.services.host import ServiceHost, ServiceSettings\n"
        "from apiary.wire import WireSettings\n"
        "async def main():\n"
        f"    host = ServiceHost('peer', WireSettings(listen_host='127.0.0.1'), ServiceSettings(identity={str(identity)!r}))\n"
        "    await host.start(); print(host.identity.peer_id); await host.shutdown()\n"
        "asyncio.run(main())\n"
    )
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert first.stdout.strip() and first.stdout == second.stdout
    assert identity.stat().st_mode & 0o777 == 0o600


def test_the_dht_and_lean_layers_import_without_torch() -> None:
    code = (
        "import sys, apiary.wire, apiary.dht, apiary.dht.api, apiary.dht.storage, apiary.telemetry\n"
        "import apiary.services.host, apiary.services.dht, apiary.cli.main  # `apiary dht` needs no torch\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_shutdown_is_not_stalled_by_a_task_that_swallows_its_cancellation() -> None:
    host = ServiceHost("peer", LOCAL, ServiceSettings())
    await host.start()
    swallowed: list[bool] = []

    async def stubborn() -> None:  # what code that loses a cancellation looks like from outside
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(True)

    task = host.spawn(stubborn(), "stubborn")
    await asyncio.sleep(0)
    await asyncio.wait_for(host.shutdown(), 10)
    assert swallowed and task.cancelled()


async def test_the_peer_record_publisher_ends_when_cancelled_as_its_store_completes() -> None:
    """A SIGTERM right after a service's ready line cancelled the publisher in the moment its first
    store completed; `asyncio.wait_for` (Python 3.11) then returned the result and lost the
    cancellation, and the service never exited."""
    published = asyncio.get_running_loop().create_future()

    class Swarm:  # a DHT whose store completes in the moment its caller is cancelled
        identity = Identity.generate()

        async def store_many(self, items: list) -> list[bool]:
            publisher.cancel()
            published.set_result(None)
            return [True] * len(items)

    record = RecordPublisher("dht", Swarm.identity.peer_id, lambda: {"address": "x"}, Swarm())  # type: ignore[arg-type]
    publisher = asyncio.create_task(record.run())
    await published
    done, _ = await asyncio.wait([publisher], timeout=5)
    assert done and publisher.cancelled()

"""Malformed HTTP/2 at real `apiary` service processes, over real sockets and TLS (the default):
after the attack every gRPC port answers a clean call, and `/healthz` tells the truth
(docs/hostile-internet.md, section 1)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from service_processes import ServiceProcess, ServiceProcesses
from wire_helpers.attacks import metric, ping, ports, public_address, send_request

from apiary.wire import ChannelPool, WireSettings

BAD_PATH = b"/apiary.wire.Probe/\xff\xfe"


@pytest.fixture(scope="module")
def services() -> Iterator[dict[str, ServiceProcess]]:
    with ServiceProcesses() as processes:
        dht = processes.start("dht", "--new-swarm").wait_until_up()
        averager = processes.start("averager", "--run-id", "hostile", "--dht-local", str(dht.local_api))
        experts = processes.start("expert-server", "--experts", "ffn.0.[0:1]", "--hidden-size", "8",
                                  "--dht-local", str(dht.local_api))
        averager.wait_until_up()
        experts.wait_until_up(until="experts served at: ")
        yield {"dht": dht, "averager": averager, "expert-server": experts}


@pytest.fixture
async def pools() -> AsyncIterator[dict[bool, ChannelPool]]:
    async with ChannelPool(WireSettings(default_timeout=10)) as tls, \
            ChannelPool(WireSettings(tls=False, default_timeout=10)) as plain:
        yield {True: tls, False: plain}


async def test_a_path_that_is_not_utf8_leaves_every_grpc_port_serving(
    services: dict[str, ServiceProcess], pools: dict[bool, ChannelPool]
) -> None:
    for port in ports(services):
        await ping(pools, port)
        sent = time.monotonic()
        await asyncio.to_thread(send_request, port.endpoint, BAD_PATH, tls=port.tls)
        await ping(pools, port)  # before the fix: the port refused every connection from here on
        print(f"{port}: serving again {time.monotonic() - sent:.2f}s after the request")
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
        dht = processes.start("dht", "--new-swarm").wait_until_up()
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



"""Reaching the swarm's DHT to look at it, and the `apiary monitor` process.

A monitor joins the DHT as a client-mode node (`initial_peers`: it serves nothing, so it needs no
public port) or reads through a participant's dht service (`dht_local`). `MonitorService` serves
the monitor app on an admin endpoint of its own (`/healthz`, `/readyz`, `/status`, `/metrics`,
and the page at `/`), reading the swarm every `refresh` seconds.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from apiary.dht import DHTNode, DHTSettings
from apiary.dht.api import DHTClient
from apiary.dht.interface import DHTLike
from apiary.monitor.app import monitor_app
from apiary.monitor.view import SwarmWatch
from apiary.telemetry import AdminServer, new_registry
from apiary.wire import ChannelPool, Endpoint, PeerAddress, WireSettings

DHT_TIMEOUT = 15.0  # seconds a call to a dht service's local API may take


async def open_dht(initial_peers: list[PeerAddress], dht_local: Endpoint | None,
                   wire: WireSettings) -> tuple[DHTLike, Callable[[], Awaitable[None]]]:
    """The DHT to read (a client-mode node joining `initial_peers`, or the dht service at
    `dht_local`) and the coroutine function that closes it; fails at once if it cannot be reached."""
    if (dht_local is None) == (not initial_peers):
        raise ValueError("give exactly one: initial peers to join as a client, or a dht service's local API")
    if dht_local is not None:
        pool = ChannelPool()
        client = DHTClient(dht_local, pool, timeout=DHT_TIMEOUT)
        try:
            await client.info()  # fails now, naming the address, if nothing answers there
        except BaseException:
            await pool.close()
            raise
        return client, pool.close
    node = await DHTNode.launch(initial_peers, settings=DHTSettings(client_mode=True), wire=wire)
    return node, node.shutdown


class MonitorService:
    """`apiary monitor`: the page and API on `host:port`, over the DHT given."""

    def __init__(self, dht: DHTLike, *, host: str = "127.0.0.1", port: int = 0, refresh: float = 5.0):
        self.watch = SwarmWatch(dht, refresh=refresh)
        self.admin = AdminServer("monitor", host=host, port=port, registry=new_registry(), status=self.status,
                                 ready=lambda: self.watch.reading is not None)
        self.admin.app.mount("/", monitor_app(self.watch))
        self._stopping = asyncio.Event()

    def status(self) -> dict[str, Any]:
        reading = self.watch.reading
        return {"read_at": reading.taken_at if reading is not None else None, "error": self.watch.error,
                "peers": len(reading.peers) if reading is not None else None, "refresh": self.watch.refresh}

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, on_start: Callable[[str], None] | None = None) -> None:
        """Serves until SIGINT/SIGTERM or `stop()`."""
        await self.admin.start()
        task = asyncio.create_task(self.watch.run(), name="monitor:watch")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        try:
            if on_start is not None:
                on_start(self.admin.url)
            await self._stopping.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await self.admin.stop()

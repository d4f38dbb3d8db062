"""The dht service: a DHT node with its public port, local API, admin endpoints and storage."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, Field

from apiary.dht import DHTNode, DHTSettings
from apiary.dht.api import LOCAL_SERVICE, LocalServicer
from apiary.dht.storage import MemoryStorage, RedisStorage, Storage
from apiary.monitor.app import mount_monitor
from apiary.monitor.view import SwarmWatch
from apiary.services.host import ServiceHost, ServiceSettings
from apiary.services.reachability import dht_peers, node_client_switch, with_client_mode
from apiary.wire import ChannelPool, Endpoint, PeerAddress, RpcServer, WireSettings

logger = logging.getLogger(__name__)


class DHTServiceSettings(BaseModel):
    initial_peers: list[PeerAddress] = Field(default_factory=list)
    redis_url: str | None = Field(None, description="keep records in Redis (survive restarts); none: in memory")
    local_host: str = Field("127.0.0.1", description="interface of the local API for this participant's services")
    local_port: int = Field(0, ge=0, le=65535, description="port of the local API (0: any free port)")
    monitor: bool = Field(False, description="serve the swarm monitor at /monitor/ of the admin endpoint")


async def open_storage(redis_url: str | None) -> Storage:
    """Redis storage when a URL is given (failing at once if Redis does not answer), else memory."""
    if not redis_url:
        return MemoryStorage()
    return await RedisStorage.open(redis_url)


class DHTService:
    """Builds and runs the service; `start()` returns once the node has joined the swarm."""

    def __init__(self, wire: WireSettings, service: ServiceSettings, dht: DHTSettings, settings: DHTServiceSettings):
        reachability, client_mode = with_client_mode(service.reachability, dht.client_mode)
        service = service.model_copy(update={"reachability": reachability})
        dht = dht.model_copy(update={"client_mode": client_mode})
        self.settings = settings
        self.host = ServiceHost("dht", wire, service, status=self.status, ready=lambda: self.joined)
        self.dht_settings = dht
        self.node: DHTNode | None = None
        self.local_server = RpcServer(wire.for_local_api(settings.local_host, settings.local_port), self.host.identity)
        self.host.watch(self.local_server, "local")
        self.host.on_stop(self.local_server.stop)
        self.joined = False

    async def start(self) -> None:
        """Opens storage, starts the servers and joins; on failure, stops what it started."""
        await self.host.start_service(self._start)

    async def _start(self) -> None:
        storage = await open_storage(self.settings.redis_url)
        self.node = DHTNode(
            self.host.identity, self.dht_settings, storage=storage,
            pool=ChannelPool(self.host.server.settings, identity=self.host.identity), registry=self.host.registry,
        )
        if not self.dht_settings.client_mode:
            self.node.attach(self.host.server)
        self.local_server.add_service(LOCAL_SERVICE, LocalServicer(self.node))
        if self.settings.monitor:
            self._serve_monitor(self.node)
        await self.host.start()
        self.host.on_stop(self.node.shutdown)
        await self.local_server.start()
        await self.node.join(self.settings.initial_peers)
        self.joined = True
        logger.info("joined the DHT: %d neighbours", len(self.node.routing), extra={"event": "joined"})
        self.host.reach(self.node.pool, dht_peers(self.node, self.settings.initial_peers), self.node,
                        None if self.dht_settings.client_mode else node_client_switch(self.node))
        self.host.publish_record(self.node)

    def _serve_monitor(self, node: DHTNode) -> None:
        watch = SwarmWatch(node)
        mount_monitor(self.host.admin.app, watch)
        self.host.spawn(watch.run(), "monitor")  # cancelled at shutdown

    @property
    def local_endpoint(self) -> Endpoint:
        return self.local_server.local_endpoint

    def status(self) -> dict[str, Any]:
        node = self.node
        if node is None:
            return {"joined": False}
        return {
            "joined": self.joined,
            "client_mode": node.settings.client_mode,
            "initial_peers_for_others": node.address,
            "local_api": str(self.local_endpoint),
            "routing_table_size": len(node.routing),
            "neighbours": [{"peer_id": c.peer_id, "address": str(c.endpoint)} for c in node.routing.contacts()],
        }

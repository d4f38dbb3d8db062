"""The averager service: averages its trainer's tensors with the swarm and keeps the latest state.

One process per participant. Its public port serves matchmaking (gRPC) and all-reduce and state
transfer (bulk) to other averagers; its local port serves the trainer (`apiary.averaging.api`):
rounds through shared memory or gRPC streaming, the state to give newcomers, and the swarm's
newest state to load. It reaches the DHT through the participant's dht service (`dht_local`)
or through a DHT node of its own that joins `initial_peers`, and re-announces its state in the
DHT every `announce_period` seconds while it holds one, so newcomers find it even while the
trainer is busy or restarting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel, Field, model_validator

from apiary.averaging.api.servicer import LocalServicer
from apiary.averaging.api.spec import FAILED, LOCAL_SERVICE, NO_GROUP, OK
from apiary.averaging.averager import Averager, AveragerSettings, RoundResult
from apiary.averaging.verification import Verifier
from apiary.averaging.spans import Role
from apiary.averaging.state import STATE_ROUTE, StateDonor, load_saved_state, save_state
from apiary.dht import DHTNode, DHTSettings
from apiary.dht.api import DHTClient
from apiary.services.host import ServiceHost, ServiceSettings
from apiary.services.reachability import dht_peers, node_client_switch, with_client_mode
from apiary.services.records import RoundLog
from apiary.wire import ChannelPool, Endpoint, PeerAddress, RequestError, RpcServer, WireSettings
from apiary.wire.bulk import BulkAnswer, BulkCall, BulkClient

logger = logging.getLogger(__name__)

STATUS_TENSORS = 64  # registered tensors listed one by one in /status


class AveragerServiceSettings(BaseModel):
    dht_local: Endpoint | None = Field(None, description="local API of this participant's dht service")
    initial_peers: list[PeerAddress] = Field(default_factory=list, description="join the DHT through these (embedded node)")
    local_host: str = Field("127.0.0.1", description="interface of the local API for this participant's trainer")
    local_port: int = Field(0, ge=0, le=65535, description="port of the local API (0: any free port)")
    announce_period: float = Field(30.0, gt=0, description="seconds between announcements of the state held")
    state_timeout: float = Field(60.0, gt=0, description="seconds LoadState may take to find and download a state")
    dht_timeout: float = Field(10.0, gt=0, description="deadline of a call to the dht service's local API")
    state_path: Path | None = Field(None, description="file that keeps the latest state across restarts")
    max_downloads: int = Field(4, ge=1, description="newcomers this donor sends its state to at once (Busy past it)")

    @model_validator(mode="after")
    def _one_way_to_the_dht(self) -> AveragerServiceSettings:
        if (self.dht_local is None) == (not self.initial_peers):
            got = "both" if self.dht_local is not None else "neither"
            raise ValueError(
                f"give exactly one of dht_local (the dht service's local API) and initial_peers "
                f"(for an embedded DHT node); got {got}"
            )
        return self


class AveragerMetrics:
    """apiary_averager_*: rounds by result, group sizes, round times, groups formed ahead, all-reduce bytes,
    state requests."""

    def __init__(self, registry: CollectorRegistry):
        self.rounds = Counter("apiary_averager_rounds", "Averaging rounds, by result (ok, no_group, failed)",
                              ["result"], registry=registry)
        self.group_size = Histogram("apiary_averager_group_size", "Peers in the groups of successful rounds",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128), registry=registry)
        self.round_seconds = Histogram(
            "apiary_averager_round_seconds", "Time of a round, matchmaking included, by result", ["result"],
            buckets=(0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 300), registry=registry,
        )
        self.formed_early = Counter("apiary_averager_groups_formed_early",
                                    "Rounds whose group was formed ahead, while the trainer computed (Prepare)",
                                    registry=registry)
        self.sent_bytes = Counter("apiary_averager_sent_bytes", "Tensor bytes of all-reduce parts and means sent",
                                  registry=registry)
        self.received_bytes = Counter("apiary_averager_received_bytes",
                                      "Tensor bytes of all-reduce parts and means received", registry=registry)
        self.state_requests = Counter("apiary_averager_state_requests",
                                      "State downloads asked of this donor, by result (ok, refused)", ["result"],
                                      registry=registry)
        for result in (OK, NO_GROUP, FAILED):  # every series exists from the start
            self.rounds.labels(result)
        for result in ("ok", "refused"):
            self.state_requests.labels(result)
        self.audits = Counter("apiary_averager_audits", "Spans others reduced for this peer that it audited, by "
                              "result (ok, lying: the reducer was banned, unanswered)", ["result"], registry=registry)
        self.banned_peers = Gauge("apiary_averager_banned_peers",
                                  "Reducers this peer caught lying, left out of its groups for the rest of the run",
                                  registry=registry)
        for result in ("ok", "lying", "unanswered"):
            self.audits.labels(result)

    def watch_verifier(self, verifier: Verifier) -> None:
        """Counts the verifier's audits and bans (verify_reductions)."""
        verifier.on_audit = lambda outcome: self.audits.labels(outcome.result).inc()
        self.banned_peers.set_function(lambda: len(verifier.banned))

    def observe(self, result: RoundResult) -> None:
        self.rounds.labels(result.result).inc()
        self.round_seconds.labels(result.result).observe(result.seconds)
        if result.result == OK:
            self.group_size.observe(result.group_size)
            if result.formed_early:
                self.formed_early.inc()


class AveragerService:
    """Builds and runs the service; `start()` returns once it reaches the DHT and serves."""

    def __init__(self, wire: WireSettings, service: ServiceSettings, averaging: AveragerSettings,
                 settings: AveragerServiceSettings):
        wire = wire.model_copy(update={"bulk": True})  # all-reduce and state transfer need it
        reachability, client_mode = with_client_mode(service.reachability, averaging.mode is Role.CLIENT)
        if client_mode and averaging.mode is Role.AUX:
            raise ValueError("an aux averager reduces others' parts: it cannot be in client mode "
                             "(--reachability client)")
        service = service.model_copy(update={"reachability": reachability})
        averaging = averaging.model_copy(update={"mode": Role.CLIENT if client_mode else averaging.mode})
        self.settings = settings
        self.averaging = averaging
        self.host = ServiceHost("averager", wire, service, status=self.status, ready=lambda: self.registered)
        self.metrics = AveragerMetrics(self.host.registry)
        self.round_log = RoundLog()  # published with its peer record
        self.pool = ChannelPool(wire, identity=self.host.identity)
        peer_id = self.host.identity.peer_id
        self.node: DHTNode | None = None
        if settings.dht_local is not None:
            self.dht: DHTClient | DHTNode = DHTClient(settings.dht_local, self.pool, timeout=settings.dht_timeout)
        else:
            self.node = DHTNode(self.host.identity, DHTSettings(client_mode=averaging.mode is Role.CLIENT),
                                pool=self.pool, registry=self.host.registry)
            self.dht = self.node
        self.averager = Averager([], self.dht, peer_id, averaging, pool=self.pool,
                                 on_bytes_sent=self.metrics.sent_bytes.inc,
                                 on_bytes_received=self.metrics.received_bytes.inc, on_round=self._round_done)
        self.donor = StateDonor(averaging.prefix, peer_id, codec=averaging.download_codec,
                                max_downloads=settings.max_downloads)
        self.state_client = BulkClient(wire, identity=self.host.identity, puncher=self.pool.puncher)
        self.servicer = LocalServicer(
            self.averager, self.donor, self.dht, wire=wire, state_client=self.state_client,
            state_timeout=settings.state_timeout, on_state=self._state_published,
        )
        self.local_server = RpcServer(wire.for_local_api(settings.local_host, settings.local_port), self.host.identity)
        self.host.watch(self.local_server, "local")
        self.local_server.add_service(LOCAL_SERVICE, self.servicer)
        self.announced_at: float | None = None
        self.started = False

    async def start(self) -> None:
        """Starts the servers and reaches the DHT; on failure, stops what it started."""
        await self.host.start_service(self._start)

    async def _start(self) -> None:
        server = self.host.server
        if self.node is not None and not self.node.settings.client_mode:
            self.node.attach(server)
        self.averager.attach(server)
        if self.averager.verifier is not None:
            self.metrics.watch_verifier(self.averager.verifier)
        assert server.bulk is not None
        server.bulk.add_route(STATE_ROUTE, self._serve_state)
        await self.host.start()
        # run at shutdown newest first: the local API stops, the segment is unmapped, then clients close
        self.host.on_stop(self._close_clients)
        self.host.on_stop(self.servicer.close)
        self.host.on_stop(self.local_server.stop)
        await self.local_server.start()
        if self.node is not None:
            await self.node.join(self.settings.initial_peers)
        else:
            await self.dht.info()  # fails now, with the address, if the dht service does not answer
        if self.averaging.mode is not Role.CLIENT:  # a client cannot be dialled: it gives no state
            self.donor.bulk_address = str(server.announced_bulk)
        if self.settings.state_path is not None:
            saved = await asyncio.to_thread(load_saved_state, self.settings.state_path)
            if saved is not None:  # a restarted averager serves what it held before
                self.donor.update(saved)
                logger.info("resumed the state of epoch %d from %s", saved.epoch, self.settings.state_path,
                            extra={"event": "checkpoint_resumed"})
                await self.announce()
        self.host.spawn(self._announce_loop(), "announce-state")
        self.host.reachability.on_change.append(self._bandwidth_through_relay)
        self.host.reach(self.pool, dht_peers(self.dht, self.settings.initial_peers), self.dht,
                        self._client_switch if self.averaging.mode is Role.NODE else None)
        self.host.publish_record(self.dht, rounds=self.round_log)
        self.started = True

    def _client_switch(self, client: bool) -> None:
        """Behind a NAT with no relay: rounds as a client (sends only), no state given, and back."""
        self.averager.settings = self.averager.settings.model_copy(
            update={"mode": Role.CLIENT if client else self.averaging.mode})
        self.donor.bulk_address = "" if client else str(self.host.server.announced_bulk)
        if self.node is not None:
            node_client_switch(self.node)(client)

    def _bandwidth_through_relay(self) -> None:
        """Relayed: the bandwidth declared to groups is at most what a circuit of the primary relay carries."""
        limit = self.host.reachability.relay_limit
        bandwidth = min(self.averaging.bandwidth, limit) if limit else self.averaging.bandwidth
        self.averager.settings = self.averager.settings.model_copy(update={"bandwidth": bandwidth})

    def _round_done(self, result: RoundResult) -> None:
        self.metrics.observe(result)
        self.round_log.observe(result)

    async def _close_clients(self) -> None:
        await self.averager.close()
        await self.state_client.close()
        if self.node is not None:
            await self.node.shutdown()  # closes the pool too
        else:
            await self.pool.close()

    # ---- state

    async def _serve_state(self, call: BulkCall) -> BulkAnswer:
        try:
            answer = await self.donor.handle(call)
        except RequestError:
            self.metrics.state_requests.labels("refused").inc()
            raise
        self.metrics.state_requests.labels("ok").inc()
        return answer

    async def _state_published(self) -> bool:
        """Keeps the new state on disk (when a state path is set), then announces it."""
        if self.settings.state_path is not None and self.donor.state is not None:
            await asyncio.to_thread(save_state, self.donor.state, self.settings.state_path)
        return await self.announce()

    async def announce(self) -> bool:
        """Lists the state held in the DHT (if any, and if others can dial us) at the server's
        current bulk address; never raises."""
        if self.donor.bulk_address:  # set at start unless a client: follows what the server announces
            self.donor.bulk_address = str(self.host.server.announced_bulk)
        if self.donor.state is None or not self.donor.bulk_address:
            return False
        try:
            announced = await self.donor.announce(self.dht, ttl=3 * self.settings.announce_period)
        except Exception as e:  # noqa: BLE001 - the next period tries again
            logger.warning("announcing the state failed: %s", e)
            return False
        if announced:
            self.announced_at = time.time()
        return announced

    async def _announce_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.announce_period)
            await self.announce()

    # ---- admin

    @property
    def registered(self) -> bool:
        return self.servicer.registration is not None

    @property
    def local_endpoint(self) -> Endpoint:
        return self.local_server.local_endpoint

    def status(self) -> dict[str, Any]:
        averaging = self.averaging
        registration = self.servicer.registration
        last = self.averager.last_round
        state = self.donor.state
        schema = None
        if registration is not None:
            listed = registration.schema.tensors[:STATUS_TENSORS]
            schema = {
                "digest": registration.schema.digest,
                "tensors": len(registration.schema),
                "numel": registration.schema.numel,
                "shared_memory": registration.segment.name if registration.segment is not None else None,
                "listed": [{"dtype": dtype, "shape": list(shape)} for dtype, shape in listed],
            }
        return {
            "run_id": averaging.prefix,
            "mode": averaging.mode.value,
            "codec": averaging.codec,
            "state_codec": averaging.state_codec or averaging.codec,
            "download_codec": averaging.download_codec,
            "target_group_size": averaging.target_group_size,
            "min_group_size": averaging.min_group_size,
            "rejoin_weight": averaging.rejoin_weight,
            "dht": (f"local API {self.settings.dht_local}" if self.node is None
                    else f"embedded node {self.node.address or '(client mode)'}"),
            "local_api": str(self.local_endpoint) if self.started else None,
            "bulk_address": self.donor.bulk_address,
            "registered": registration is not None,
            "schema": schema,
            "next_round": self.averager.round_index,
            "last_round": None if last is None else {
                "result": last.result, "group_size": last.group_size, "seconds": round(last.seconds, 3),
                "finished_at": last.finished_at, "error": last.error,
            },
            "verify_reductions": averaging.verify_reductions,
            "banned_peers": dict(self.averager.verifier.banned) if self.averager.verifier is not None else {},
            "donor_epoch": state.epoch if state is not None else None,
            "donor_tensors": len(state.tensors) if state is not None else 0,
            "state_announced_at": self.announced_at,
        }

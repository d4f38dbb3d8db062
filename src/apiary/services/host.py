"""What every apiary service process shares: identity, gRPC server, admin endpoints, tracing.

A `ServiceHost` starts these in order, runs until asked to stop (SIGINT/SIGTERM or
`stop()`), then shuts them down in reverse order, cancelling every background task it was
given, so a stopped service leaves nothing running.

It watches its gRPC servers (the public one, and the local API a service adds with `watch`):
`/healthz` answers 503 naming a server that stopped and could not be restarted, and
`<prefix>_grpc_server_restarts_total{api}` counts the times one stopped unasked and was
restarted (`apiary.wire.server`). Its metrics also say which run the service takes part in
(`apiary_run_info{run}`, from the `run_id` of its status) and, in a private run, when its access
token expires (`apiary_access_token_expiry_timestamp_seconds`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field

from apiary.services.records import RecordPublisher, RoundLog
from apiary.services.reachability import Peers, Reachability, ReachabilitySettings
from apiary.telemetry import AdminServer, TracingSettings, configure_tracing, metric_prefix, new_registry
from apiary.dht.interface import DHTLike
from apiary.wire import ChannelPool, Identity, PeerAddress, RpcServer, WireSettings
from apiary.wire.auth import read_token

logger = logging.getLogger(__name__)
CANCEL_ROUNDS = 5  # a task gets this many cancellations, `CANCEL_WAIT` seconds apart, before it is abandoned
CANCEL_WAIT = 2.0


class ServiceSettings(BaseModel):
    """Settings every service has besides its wire settings."""

    identity: Path | None = Field(None, description="identity file (created if absent); none: a new id per start")
    admin_host: str = Field("127.0.0.1", description="interface of the admin HTTP endpoint")
    admin_port: int = Field(0, ge=0, le=65535, description="admin HTTP port (0: any free port)")
    tracing: TracingSettings = TracingSettings()
    reachability: ReachabilitySettings = ReachabilitySettings()


class ServerWatch(Collector):
    """The gRPC servers of one service, by API (public, local): restarts and who stopped for good."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.servers: dict[str, RpcServer] = {}

    def problems(self) -> list[str]:
        return [f"the {api} gRPC server (port {server.port}) stopped and could not be restarted"
                for api, server in self.servers.items() if server.started and not server.serving]

    def collect(self) -> Iterator[CounterMetricFamily]:
        restarts = CounterMetricFamily(f"{self.prefix}_grpc_server_restarts",
                                       "Times a gRPC server stopped without being asked and was started again, by API",
                                       labels=["api"])
        for api, server in self.servers.items():
            restarts.add_metric([api], server.restarts)
        yield restarts


class RunInfo(Collector):
    """`apiary_run_info{run}` = 1 for a service of one run (its status names a `run_id`), so that
    dashboards and alerts can select a run's services."""

    def __init__(self, status: Callable[[], Mapping[str, Any]]):
        self.status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("apiary_run_info", "The run this service takes part in (always 1)", labels=["run"])
        try:
            run = self.status().get("run_id")
        except Exception:  # /status reports the failure; the metrics stay readable
            run = None
        if run:
            family.add_metric([str(run)], 1)
        yield family


class ServiceHost:
    """Runs one service: its RpcServer, AdminServer and background tasks."""

    def __init__(
        self,
        service: str,
        wire: WireSettings,
        settings: ServiceSettings,
        *,
        status: Callable[[], Mapping[str, Any]] | None = None,
        ready: Callable[[], bool] | None = None,
    ):
        self.service = service
        self.settings = settings
        self.identity = Identity.load_or_create(settings.identity) if settings.identity else Identity.generate()
        self.registry = new_registry()
        self.server = RpcServer(wire, self.identity, registry=self.registry, metrics_prefix=metric_prefix(service))
        self.servers = ServerWatch(metric_prefix(service))
        self.servers.servers["public"] = self.server
        self.registry.register(self.servers)
        if status is not None:
            self.registry.register(RunInfo(status))
        self.reachability = Reachability(self.server, settings.reachability, metric_prefix(service))
        if wire.run_authority and wire.access_token:  # an open run may name an empty token file
            Gauge("apiary_access_token_expiry_timestamp_seconds", "When this peer's access token expires (Unix time)",
                  registry=self.registry).set(read_token(wire.access_token).expires_at)
        self.admin = AdminServer(
            service,
            host=settings.admin_host,
            port=settings.admin_port,
            registry=self.registry,
            status=lambda: {"peer_id": self.identity.peer_id, "address": self.address, **(status() if status else {}),
                            **({"reachability": self.reachability.status()} if self.reachability.running else {})},
            ready=ready,
            problems=self.servers.problems,
            detail=lambda: {"reachability": self.reachability.state.value} if self.reachability.running else {},
        )
        self._status = status
        self._ready = ready
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self._cleanups: list[Callable[[], Awaitable[None]]] = [self.server.stop]

    @property
    def address(self) -> str:
        """The full address others use to reach this service: `peer_id@host:port` (relayed:
        `peer_id@relay-host:port/via/<relay-peer-id>`)."""
        return str(PeerAddress(self.server.announced, self.identity.peer_id))

    async def start(self) -> None:
        configure_tracing(self.service, self.settings.tracing)
        await self.server.start()
        await self.admin.start()
        self._cleanups.append(self.admin.stop)
        logger.info("%s started: peer id %s, public %s, admin %s", self.service, self.identity.peer_id,
                    self.server.announced, self.admin.url, extra={"event": "started"})

    async def start_service(self, start: Callable[[], Awaitable[None]]) -> None:
        """Runs a service's start-up (which calls `start()` of this host); if it fails, stops
        whatever it had started before re-raising."""
        try:
            await start()
        except BaseException:
            await self.shutdown()
            raise

    def watch(self, server: RpcServer, api: str) -> None:
        """Adds a service's other gRPC server (e.g. its local API, `api="local"`) to `/healthz` and
        the restart count."""
        self.servers.servers[api] = server

    def publish_record(self, dht: Any, *, experts: Callable[[], list[str]] | None = None,
                       rounds: RoundLog | None = None) -> RecordPublisher:
        """Keeps this service's peer record (and an averager's `rounds`) in the DHT until shutdown
        (`apiary.services.records`); `dht`: the DHT, or a function giving the dht service's local API."""
        status = lambda: {"address": self.address, "reachability": self.reachability.state.value,  # noqa: E731
                          **(self._status() if self._status else {})}
        publisher = RecordPublisher(self.service, self.identity.peer_id, status, dht, experts=experts, rounds=rounds)
        self.spawn(publisher.run(), "peer-record")
        return publisher

    def reach(self, pool: ChannelPool, peers: Peers, dht: DHTLike | None,
              client: Callable[[bool], None] | None = None) -> None:
        """Runs the reachability lifecycle (`apiary.services.reachability`) until shutdown: `peers`
        lists whom to ask (DHT contacts), `dht` is where relays are listed, `client` switches the
        service to and from its client mode (None: it has none)."""
        self.registry.register(self.reachability)  # its metrics: only a service that runs it has them
        pool.puncher.export(self.registry, metric_prefix(self.service))  # <prefix>_punches_total{outcome}
        self.spawn(self.reachability.run(pool, peers, dht, client), "reachability")

    def on_stop(self, cleanup: Callable[[], Awaitable[None]]) -> None:
        """Registers a coroutine function to run at shutdown (before the servers stop)."""
        self._cleanups.append(cleanup)

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Runs a background task that is cancelled at shutdown; its failure stops the service."""
        task = asyncio.create_task(coroutine, name=f"{self.service}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s failed: %r; stopping", task.get_name(), task.exception())
            self._stopping.set()

    def stop(self) -> None:
        """Asks `run()` to return; safe to call from a signal handler."""
        self._stopping.set()

    async def run(self, duration: float | None = None) -> None:
        """Serves until stopped, a signal arrives, or `duration` seconds pass; then shuts down."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        self.spawn(self._log_ready(), "ready-log")
        try:
            async with asyncio.timeout(duration):
                await self._stopping.wait()
        except asyncio.TimeoutError:
            pass
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self.shutdown()

    async def _log_ready(self) -> None:
        """Logs the `ready` event once `/readyz` would first answer ready (checked every 0.5 s)."""
        while self._ready is not None and not self._ready():
            await asyncio.sleep(0.5)
        logger.info("%s ready: %s", self.service, self.address, extra={"event": "ready"})

    async def shutdown(self) -> None:
        """Cancels background tasks and stops everything started, newest first."""
        await cancel_tasks(list(self._tasks), self.service)
        while self._cleanups:
            await self._cleanups.pop()()


async def cancel_tasks(tasks: list[asyncio.Task[Any]], owner: str) -> None:
    """Cancels `tasks` and waits for them to end. A task still running `CANCEL_WAIT` seconds after
    its cancellation (code that swallowed it: e.g. Python 3.11's `asyncio.wait_for` when its awaited
    call completes in the same moment) is cancelled again, `CANCEL_ROUNDS` times at most, and then
    left behind with an error line rather than stalling the shutdown."""
    pending = {task for task in tasks if not task.done()}
    for _ in range(CANCEL_ROUNDS):
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_WAIT)
    if pending:
        logger.error("%s: %d background task(s) ignored cancellation and are left running: %s", owner,
                     len(pending), ", ".join(sorted(task.get_name() for task in pending)))

"""Reachability: the lifecycle every service runs to be dialled wherever it runs.

`--reachability` (`ReachabilityMode`) chooses it:
- `auto` (default): at start and every `reachability_period` seconds the service checks whether
  peers can dial it back (`apiary.wire.reachability.check_reachability`, asking peers its DHT
  knows). With no `--announce-host`, it announces the public host a majority of them observe
  (`apiary.wire.observed`); a configured announce host that they could not dial (private,
  loopback, link-local, documentation) while they observe a public one is reported in one log
  line, on /status and as `<prefix>_announce_mismatch`, never silently used. A service found
  behind a NAT keeps reservations at `relays` relays listed in the DHT (`apiary.services.relays`)
  and announces its primary relayed endpoint; with no relay to be found it serves as a client
  where it has a client mode. Each switch is one log line.
- `public`: announced as configured, no check; `relayed`: reservations from the start, no
  check; `client`: nothing is announced (the service's own client mode).

The state (`ReachabilityState`) is on /status (`reachability`), in /readyz and in
`<prefix>_reachability{state}` (1 for the current state). A service that offers relaying and
is not itself behind a NAT lists its relay in the DHT every `RELAY_LIST_SECONDS`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from enum import StrEnum
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field

from apiary.dht import DHTNode
from apiary.dht.api import DHTClient
from apiary.dht.interface import DHTLike
from apiary.services.relays import list_relay, listed_relays
from apiary.wire import ChannelPool, Endpoint, PeerAddress, RpcServer
from apiary.wire.observed import PUBLIC, announce_problem, host_scope
from apiary.wire.reachability import ReachabilityReport, Verdict, check_reachability
from apiary.wire.relay import Reservations

logger = logging.getLogger(__name__)

CHECK_SECONDS = 5.0  # deadline of one check (pings and dial-backs)
RETRY_SECONDS = 30.0  # next check when too few peers could be asked (a swarm still forming)
RELAY_WAIT_SECONDS = 5.0  # how long a service found behind NAT waits for a first reservation
RELAY_LIST_SECONDS = 60.0  # period of a relay's record in the DHT (it lives three)


class ReachabilityMode(StrEnum):
    AUTO = "auto"
    PUBLIC = "public"
    RELAYED = "relayed"
    CLIENT = "client"


class ReachabilityState(StrEnum):
    UNKNOWN = "unknown"
    PUBLIC = "public"
    BEHIND_NAT = "behind_nat"
    RELAYED = "relayed"
    CLIENT = "client"


class ReachabilitySettings(BaseModel):
    """How a service makes itself reachable (its relay, if it offers one, is in WireSettings)."""

    reachability: ReachabilityMode = Field(ReachabilityMode.AUTO, description="auto (check, then relayed or client "
                                           "behind NAT), public (no check), relayed (always through relays) or client")
    relays: int = Field(2, ge=1, le=16, description="relay reservations kept when behind NAT")
    reachability_period: float = Field(300.0, gt=0, description="seconds between reachability checks")


Peers = Callable[[], Awaitable[list[PeerAddress]]]
ASKED_CONTACTS = 16  # DHT contacts a check picks its helpers among


def with_client_mode(settings: ReachabilitySettings, client_mode: bool) -> tuple[ReachabilitySettings, bool]:
    """A service's reachability and client-mode settings made to agree: `--reachability client`
    means the service's client mode, and a service in client mode by its own setting is not checked."""
    if client_mode:
        return settings.model_copy(update={"reachability": ReachabilityMode.CLIENT}), True
    return settings, settings.reachability is ReachabilityMode.CLIENT


def dht_peers(dht: DHTNode | DHTClient, initial: Sequence[PeerAddress] = ()) -> Peers:
    """Whom a service asks: `initial` peers and a sample of its DHT's contacts (an embedded node's
    routing table, or the participant's dht service's through its local API)."""

    async def peers() -> list[PeerAddress]:
        if isinstance(dht, DHTClient):
            return [*initial, *await dht.contacts(ASKED_CONTACTS)]
        contacts = dht.routing.contacts()
        sample = random.sample(contacts, min(ASKED_CONTACTS, len(contacts)))
        return [*initial, *(PeerAddress(contact.endpoint, contact.peer_id) for contact in sample)]

    return peers


def node_client_switch(node: DHTNode) -> Callable[[bool], None]:
    """Switches a serving DHT node to client mode (its messages no longer name an address, so
    nobody adds it to a routing table) and back."""

    def switch(client: bool) -> None:
        node.settings = node.settings.model_copy(update={"client_mode": client})

    return switch


class Reachability(Collector):
    """The reachability of one service's public server; `run()` is its lifecycle."""

    def __init__(self, server: RpcServer, settings: ReachabilitySettings, prefix: str):
        self.server = server
        self.settings = settings
        self.prefix = prefix
        self.mode = settings.reachability
        self.state = ReachabilityState.CLIENT if self.mode is ReachabilityMode.CLIENT else ReachabilityState.UNKNOWN
        self.detail = "not checked yet"
        self.report: ReachabilityReport | None = None
        self.observed_host: str | None = None  # the majority of what peers observe, once known
        self.problem: str | None = None  # the announce host's problem (announce_problem), if any
        self.reservations: Reservations | None = None
        self._client: Callable[[bool], None] | None = None
        self._relayed = asyncio.Event()
        self._reserving = False  # the reservations are kept (started, not stopped)
        self._relay_limits: dict[str, float] = {}  # relay peer id -> bytes/s per circuit (0: none), as listed
        self.on_change: list[Callable[[], None]] = []  # called after each change of state or relayed address
        self.running = False

    # ---- what others read

    def status(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "state": self.state.value,
            "observed_host": self.observed_host,
            "detail": self.detail,
            "relayed_addresses": [str(e) for e in self.reservations.endpoints] if self.reservations else [],
            "checked_at": self.report.checked_at if self.report is not None else None,
            "announce_problem": self.problem,
        }

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(f"{self.prefix}_reachability", "How peers reach this service (1: the current "
                                   "state)", labels=["state"])
        for state in ReachabilityState:
            family.add_metric([state.value], float(state is self.state))
        yield family
        yield GaugeMetricFamily(f"{self.prefix}_announce_mismatch", "1 when the configured announce host is one "
                                "peers cannot dial while they observe this node at a public host",
                                value=float(self.problem is not None))

    @property
    def relay_limit(self) -> float | None:
        """Bytes per second a circuit through the primary relay may carry, when relayed (None: no limit)."""
        endpoints = self.reservations.endpoints if self.reservations is not None else []
        if self.state is not ReachabilityState.RELAYED or not endpoints:
            return None
        return self._relay_limits.get(endpoints[0].relay_peer) or None

    # ---- the lifecycle

    async def run(self, pool: ChannelPool, peers: Peers, dht: DHTLike | None,
                  client: Callable[[bool], None] | None = None) -> None:
        """Checks, announces and keeps relays until cancelled. `peers`: whom to ask (DHT contacts);
        `dht`: where relays are listed (None: no relays); `client`: the service's switch to and
        from client mode (None: it has none)."""
        self._client = client
        self.running = True
        try:
            if self.mode is ReachabilityMode.CLIENT:
                self.detail = "client mode (--reachability client): nothing announced"
                await asyncio.Event().wait()
            if dht is not None and self.mode in (ReachabilityMode.AUTO, ReachabilityMode.RELAYED):
                self.reservations = Reservations(self.server, pool, lambda: self._find_relays(dht),
                                                 count=self.settings.relays, on_change=self._relays_changed)
            if self.mode is ReachabilityMode.RELAYED:
                await self._use_relays("--reachability relayed")
            if self.mode is ReachabilityMode.PUBLIC:
                self._set(ReachabilityState.PUBLIC, "--reachability public: announced as configured, not checked")
            relay_dht = dht if self.server.relay is not None else None
            next_check = next_listing = time.monotonic()
            while True:
                if self.mode is ReachabilityMode.AUTO and time.monotonic() >= next_check:
                    next_check = time.monotonic() + await self._check_safely(pool, peers)
                if relay_dht is not None and time.monotonic() >= next_listing:
                    next_listing = time.monotonic() + RELAY_LIST_SECONDS
                    await self._list_relay(relay_dht)
                wakes = [*([next_check] if self.mode is ReachabilityMode.AUTO else []),
                         *([next_listing] if relay_dht is not None else [])]
                if not wakes:
                    await asyncio.Event().wait()
                await asyncio.sleep(max(0.0, min(wakes) - time.monotonic()))
        finally:
            self.running = False
            if self.reservations is not None:
                await self.reservations.stop()

    async def _check_safely(self, pool: ChannelPool, peers: Peers) -> float:
        """`check()` of the peers `peers()` lists; a failure is logged and the check retried later."""
        try:
            async with asyncio.timeout(CHECK_SECONDS):
                asked = await peers()
        except Exception as e:  # noqa: BLE001 - none to ask this time; the next check asks again
            logger.info("reachability: could not list peers to ask: %s", e)
            asked = []
        try:
            return await self.check(pool, asked)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the service stops
            # a gRPC call cancelled under the check (e.g. its channel closed as a relayed peer moved
            # to a punched connection): this check is void, the lifecycle goes on
            logger.warning("reachability check cut short: a call it made was cancelled; checking again soon")
        except Exception:  # noqa: BLE001 - a check's own failure must not stop the service
            logger.exception("reachability check failed")
        return min(RETRY_SECONDS, self.settings.reachability_period)

    async def check(self, pool: ChannelPool, peers: list[PeerAddress]) -> float:
        """One check: learns the observed host, judges, switches; returns the seconds to the next."""
        report = await check_reachability(self.server, pool, peers, timeout=CHECK_SECONDS)
        self.report = report
        self._learn(report.observed_host)
        if report.verdict is Verdict.PUBLIC:
            if self.reservations is not None and self._reserving:  # dialled directly again: relays let go
                self._reserving = False
                await self.reservations.stop()
            self._set(ReachabilityState.PUBLIC, report.detail)
        elif report.verdict is Verdict.BEHIND_NAT:
            if self.state is not ReachabilityState.RELAYED:
                await self._use_relays(report.detail)
        elif self.state is ReachabilityState.UNKNOWN:
            self._set(ReachabilityState.UNKNOWN, report.detail)
        else:  # no verdict this time (too few helpers answered): the last one stands
            self.detail = f"{report.detail}; still {self.state.value} from the check before"
        enough = len(report.asked) >= 2 and report.verdict is not Verdict.UNKNOWN
        return self.settings.reachability_period if enough else min(RETRY_SECONDS, self.settings.reachability_period)

    def _learn(self, observed: str | None) -> None:
        """Announces the host peers observe (with no announce host set), or reports the set one."""
        self.observed_host = observed or self.observed_host
        configured = self.server.settings.announce_host
        if configured:
            problem = announce_problem(configured, self.observed_host)
            if problem is not None and problem != self.problem:
                logger.warning("%s", problem)
            self.problem = problem
        elif observed is not None and host_scope(observed) == PUBLIC and self.state is not ReachabilityState.RELAYED:
            if self.server.announced.host != observed:
                logger.info("peers observe this node at %s: announcing it", observed)
                self.server.announce(*self._direct())

    def _direct(self) -> tuple[Endpoint, Endpoint | None]:
        """The endpoints this server is dialled at directly (at the observed host when learned)."""
        settings = self.server.settings
        host = settings.resolved_announce_host()
        if not settings.announce_host and self.observed_host is not None and host_scope(self.observed_host) == PUBLIC:
            host = self.observed_host
        bulk = self.server.bulk
        return (Endpoint(host, settings.announce_port or self.server.port),
                None if bulk is None else Endpoint(host, settings.announce_bulk_port or bulk.port))

    def _announce(self) -> None:
        """Announces the primary relayed endpoint when relayed; back to the direct ones after."""
        relayed = self.reservations.endpoints if self.reservations is not None else []
        if self.state is ReachabilityState.RELAYED and relayed:
            if self.server.announced != relayed[0]:
                self.server.announce(relayed[0], relayed[0] if self.server.bulk is not None else None)
        elif self.server.announced.relayed:
            self.server.announce(*self._direct())

    async def _use_relays(self, why: str) -> None:
        """Behind NAT: reserves at relays; relayed if one answers in time, else a client (or unreachable)."""
        if self.reservations is None:
            self._unreachable(f"{why}; no DHT to find relays in")
            return
        if not self._reserving:
            self._relayed.clear()
            await self.reservations.start()
            self._reserving = True
        try:
            async with asyncio.timeout(RELAY_WAIT_SECONDS):
                await self._relayed.wait()
        except TimeoutError:
            self._unreachable(f"{why}; no relay found yet (still looking)")

    async def _find_relays(self, dht: DHTLike) -> list[PeerAddress]:
        listed = await listed_relays(dht)
        self._relay_limits.update({relay.address.peer_id: relay.limit for relay in listed if relay.address.peer_id})
        return [relay.address for relay in listed]

    def _relays_changed(self) -> None:
        assert self.reservations is not None
        endpoints = self.reservations.endpoints
        if endpoints:
            self._set(ReachabilityState.RELAYED, f"reached through {len(endpoints)} relay(s), primary {endpoints[0]}")
            self._relayed.set()
        elif self.state is ReachabilityState.RELAYED:
            self._unreachable("every relay reservation was lost (looking for others)")

    def _unreachable(self, why: str) -> None:
        self._set(ReachabilityState.CLIENT if self._client is not None else ReachabilityState.BEHIND_NAT, why)

    def _set(self, state: ReachabilityState, detail: str) -> None:
        """Moves to `state`: announces accordingly, switches client mode, says so in one line."""
        previous, self.state, self.detail = self.state, state, detail
        self._announce()
        if self._client is not None and (state is ReachabilityState.CLIENT) != (previous is ReachabilityState.CLIENT):
            self._client(state is ReachabilityState.CLIENT)
        for listener in self.on_change:
            listener()
        if state is not previous:
            how = {ReachabilityState.CLIENT: "serving as a client: nobody can dial it",
                   ReachabilityState.BEHIND_NAT: "nobody can dial it and it has no client mode",
                   }.get(state, f"announcing {self.server.announced}")
            logger.info("reachability: %s -> %s (%s); %s", previous.value, state.value, detail, how)

    async def _list_relay(self, dht: DHTLike) -> None:
        if self.state in (ReachabilityState.BEHIND_NAT, ReachabilityState.RELAYED, ReachabilityState.CLIENT):
            return  # a relay others cannot dial is of no use to them
        try:
            await list_relay(dht, self.server, ttl=3 * RELAY_LIST_SECONDS)
        except Exception as e:  # noqa: BLE001 - listed again next period
            logger.warning("listing this relay in the DHT failed: %s", e)

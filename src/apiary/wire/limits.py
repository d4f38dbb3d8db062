"""Limits on what remote peers may ask of a server, so that no peer can exhaust it for others.

`ServerLimits` is shared by a server's gRPC services and its bulk transport:
- per peer, a request rate (a token bucket: `max_requests_per_second`, bursts of
  `request_burst`) and a number of calls in flight (`max_concurrent_per_peer`);
- per peer, a number of open bulk connections (`max_bulk_connections_per_peer`);
- per server, a budget of tensor bytes being received (`max_bytes_in_flight`), taken before
  anything is allocated, so that concurrent streams cannot multiply a tensor's size into
  unbounded memory; one peer may hold at most its share of it (`max_bytes_in_flight_per_peer`),
  so that a single peer cannot exhaust it for the others.
A peer is its transport address' host (no authenticated id exists yet); the state kept per peer
is bounded (`max_tracked_peers`, least recently seen peers forgotten first). A refused request
gets RESOURCE_EXHAUSTED naming the limit, counted in `<prefix>_rpc_rejected_total{reason}`; a
stream that stalls for `stream_stall_timeout` seconds is aborted (reason `stalled`). The bytes
reserved now are `<prefix>_in_flight_bytes`.
"""

from __future__ import annotations

import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from apiary.wire.errors import Busy, RequestError
from apiary.wire.settings import WireSettings

RATE, CONCURRENCY, CONNECTIONS, BYTES, PEERS, STALLED = (
    "rate", "concurrency", "connections", "bytes_in_flight", "peers", "stalled")
REASONS = (RATE, CONCURRENCY, CONNECTIONS, BYTES, PEERS, STALLED)


class LimitExceeded(Busy):
    """A request refused by a limit (RESOURCE_EXHAUSTED); `reason` is one of `REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class StreamStalled(RequestError):
    """A stream that sent nothing for `stream_stall_timeout` seconds (DEADLINE_EXCEEDED); it is
    aborted and gives its bytes in flight back, counted in `rejected{reason="stalled"}`."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = STALLED


def peer_key(transport_peer: str) -> str:
    """The host of a gRPC peer string (`ipv4:1.2.3.4:5678`, `ipv6:%5B::1%5D:5678`) or of a
    `host:port` address: all connections from one host share its limits."""
    kind, _, address = transport_peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        address = transport_peer
    address = urllib.parse.unquote(address)
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")


@dataclass
class _PeerState:
    tokens: float
    updated: float
    in_flight: int = 0
    connections: int = 0


class ByteBudget:
    """Bytes a server holds for what peers send; `take` refuses what does not fit, in all or in
    the sending peer's share (`peer_share`), so that no single peer can exhaust the budget."""

    def __init__(self, capacity: int, on_refusal: Callable[[str], None] = lambda reason: None, *,
                 peer_share: int | None = None):
        self.capacity = capacity
        self.peer_share = capacity if peer_share is None else peer_share
        self.used = 0
        self.used_by: dict[str, int] = {}  # only peers holding bytes now
        self._on_refusal = on_refusal

    def take(self, nbytes: int, what: str, peer: str | None = None) -> None:
        """Reserves `nbytes` for `what` sent by `peer`; raises LimitExceeded if the budget, or the
        peer's share of it, cannot hold them now."""
        if nbytes > self.capacity - self.used:
            self._on_refusal(BYTES)
            raise LimitExceeded(BYTES, f"{what} of {nbytes} bytes does not fit: {self.used} of "
                                       f"max_bytes_in_flight={self.capacity} bytes are in use")
        if peer is not None:
            held = self.used_by.get(peer, 0)
            if nbytes > self.peer_share - held:
                self._on_refusal(BYTES)
                raise LimitExceeded(BYTES, f"{what} of {nbytes} bytes does not fit: peer {peer} already holds {held} "
                                           f"of its max_bytes_in_flight_per_peer={self.peer_share} bytes")
            self.used_by[peer] = held + nbytes
        self.used += nbytes

    def give_back(self, nbytes: int, peer: str | None = None) -> None:
        self.used = max(0, self.used - nbytes)
        if peer is not None and peer in self.used_by:
            left = self.used_by[peer] - nbytes
            if left > 0:
                self.used_by[peer] = left
            else:
                del self.used_by[peer]

    def for_peer(self, peer: str) -> PeerBudget:
        """This budget as seen by one peer's stream: every take and give-back charges its share."""
        return PeerBudget(self, peer)


@dataclass(frozen=True)
class PeerBudget:
    """A `ByteBudget` charged to one peer (`apiary.wire.chunks.Budget`)."""

    budget: ByteBudget
    peer: str

    def take(self, nbytes: int, what: str) -> None:
        self.budget.take(nbytes, what, self.peer)

    def give_back(self, nbytes: int) -> None:
        self.budget.give_back(nbytes, self.peer)


class ServerLimits:
    """The limits of one server (gRPC and bulk), from its `WireSettings`."""

    def __init__(self, settings: WireSettings, *, registry: CollectorRegistry | None = None,
                 prefix: str = "apiary_wire"):
        self.settings = settings
        self._peers: OrderedDict[str, _PeerState] = OrderedDict()
        self.rejected: dict[str, int] = dict.fromkeys(REASONS, 0)
        self._counter = None
        if registry is not None:
            self._counter = Counter(f"{prefix}_rpc_rejected",
                                    "Requests and connections refused by a limit or for their credentials, by reason",
                                    ["reason"], registry=registry)
            for reason in REASONS:
                self._counter.labels(reason)
        self.bytes_in_flight = ByteBudget(settings.max_bytes_in_flight, self.count_refusal,
                                          peer_share=settings.peer_share)
        if registry is not None:
            Gauge(f"{prefix}_in_flight_bytes", "Bytes of tensors and frames being received from peers, reserved",
                  registry=registry).set_function(lambda: self.bytes_in_flight.used)

    def count_refusal(self, reason: str) -> None:
        """Counts one refusal: by a limit here, or for credentials (`apiary.wire.auth.REASONS`)."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if self._counter is not None:
            self._counter.labels(reason).inc()

    def _refuse(self, reason: str, message: str) -> LimitExceeded:
        self.count_refusal(reason)
        return LimitExceeded(reason, message)

    def _state(self, peer: str) -> _PeerState:
        state = self._peers.get(peer)
        now = time.monotonic()
        if state is None:
            if len(self._peers) >= self.settings.max_tracked_peers:
                idle = next((key for key, s in self._peers.items() if not s.in_flight and not s.connections), None)
                if idle is None:
                    raise self._refuse(PEERS, f"this server already tracks max_tracked_peers="
                                              f"{self.settings.max_tracked_peers} busy peers")
                del self._peers[idle]
            state = self._peers[peer] = _PeerState(float(self.settings.request_burst), now)
        else:
            rate = self.settings.max_requests_per_second
            state.tokens = min(float(self.settings.request_burst), state.tokens + (now - state.updated) * rate)
            state.updated = now
        self._peers.move_to_end(peer)
        return state

    def admit(self, peer: str) -> Callable[[], None]:
        """Admits one request from `peer`, or raises LimitExceeded (rate or concurrency); returns
        the function to call once the request is served."""
        state = self._state(peer)
        if state.in_flight >= self.settings.max_concurrent_per_peer:
            raise self._refuse(CONCURRENCY, f"peer {peer} already has max_concurrent_per_peer="
                                            f"{self.settings.max_concurrent_per_peer} calls in flight")
        if state.tokens < 1:
            raise self._refuse(RATE, f"peer {peer} exceeds max_requests_per_second="
                                     f"{self.settings.max_requests_per_second:g} (bursts of {self.settings.request_burst})")
        state.tokens -= 1
        state.in_flight += 1

        def done() -> None:
            state.in_flight -= 1

        return done

    def open_connection(self, peer: str) -> Callable[[], None]:
        """Admits a bulk connection from `peer` or raises LimitExceeded; returns the function to
        call when it closes."""
        state = self._state(peer)
        if state.connections >= self.settings.max_bulk_connections_per_peer:
            raise self._refuse(CONNECTIONS, f"peer {peer} already has max_bulk_connections_per_peer="
                                            f"{self.settings.max_bulk_connections_per_peer} bulk connections open")
        state.connections += 1

        def closed() -> None:
            state.connections -= 1

        return closed

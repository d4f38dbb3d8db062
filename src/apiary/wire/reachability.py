"""Reachability checks (AutoNAT-like): can peers dial this node at what it announces?

A node asks a few random peers to `DialBack` its announced gRPC and bulk ports. A helper dials
back only the host the call came from (the request has no field for a host, so it cannot be
aimed at a third party), with a short deadline, and only so often per caller host (`DialBacks`'
limits; a refusal is RESOURCE_EXHAUSTED naming the limit). There it asks for the nonce whose
SHA-256 it sends (`Nonce`, over gRPC and over the bulk route `NONCE_ROUTE`): only the node that
awaits the nonce can answer, so another process answering at that address does not count.

`check_reachability` runs one check: it pings the given peers (their replies carry this node's
observed address), then asks at least `helpers` of them to dial back, and gives a `Verdict`.
The DialBack and Nonce methods are part of the `apiary.wire.Probe` service (`DIAL_BACK`, hosted
by every `RpcServer` beside `PROBE`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from apiary.wire.address import Endpoint, PeerAddress
from apiary.wire.bulk import BulkAnswer, BulkCall, BulkClient
from apiary.wire.client import ChannelPool, RpcClient
from apiary.wire.errors import InvalidRequest, NotFoundHere, WireError
from apiary.wire.identity import Identity, IdentityError, public_key_from_peer_id
from apiary.wire.limits import LimitExceeded, ServerLimits
from apiary.wire.observed import ObservedAddresses, observed_endpoint, observed_host
from apiary.wire.probe import PROBE
from apiary.wire.protos.wire_pb2 import (
    DialBackReply,
    DialBackRequest,
    NonceReply,
    NonceRequest,
    PingReply,
    PingRequest,
)
from apiary.wire.rpc import CallContext, Method, ServiceSpec, decode
from apiary.wire.settings import WireSettings

if TYPE_CHECKING:
    from apiary.wire.server import RpcServer

DIAL_BACK = ServiceSpec(
    PROBE.name,
    (
        Method("DialBack", DialBackRequest, DialBackReply),
        Method("Nonce", NonceRequest, NonceReply),
    ),
)
NONCE_ROUTE = f"{PROBE.name}/Nonce"

DIAL_SECONDS = 2.0  # a helper's deadline to reach the caller (less if the caller's own deadline is nearer)
DIAL_BACKS_PER_SECOND = 0.2  # per caller host, on average ...
DIAL_BACK_BURST = 4  # ... in bursts of at most this many
DIAL_BACKS_AT_ONCE = 2  # per caller host
NONCE_BYTES = (16, 64)
_MARGIN = 0.25  # seconds a helper keeps to answer after dialling


class Verdict(StrEnum):
    PUBLIC = "public"
    BEHIND_NAT = "behind_nat"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ReachabilityReport:
    """One check's outcome: the verdict, the host peers observe, a line saying why, when, and
    the peers asked to dial back."""

    verdict: Verdict
    observed_host: str | None
    detail: str
    checked_at: float
    asked: tuple[str, ...]


class DialBacks:
    """Both sides of dial-back checks, for one server: the nonces its own checks await (answered
    by `nonce` and `bulk_nonce`) and the dial-backs it makes for others (`dial_back`)."""

    def __init__(self, settings: WireSettings, identity: Identity):
        self.settings = settings
        self.identity = identity
        self._awaited: dict[bytes, bytes] = {}  # SHA-256 of a nonce -> the nonce
        self.limits = ServerLimits(settings.model_copy(update={
            "max_requests_per_second": DIAL_BACKS_PER_SECOND, "request_burst": DIAL_BACK_BURST,
            "max_concurrent_per_peer": DIAL_BACKS_AT_ONCE}))

    @contextlib.contextmanager
    def awaiting(self, nonce: bytes) -> Iterator[None]:
        """While inside, this server echoes `nonce` to whoever asks for it by its digest."""
        digest = hashlib.sha256(nonce).digest()
        self._awaited[digest] = nonce
        try:
            yield
        finally:
            self._awaited.pop(digest, None)

    def _recall(self, digest: bytes) -> NonceReply:
        nonce = self._awaited.get(bytes(digest))
        if nonce is None:
            raise NotFoundHere("no reachability check of this peer awaits a nonce with that digest")
        return NonceReply(nonce=nonce)

    async def nonce(self, request: NonceRequest, context: CallContext) -> NonceReply:
        return self._recall(request.digest)

    async def bulk_nonce(self, call: BulkCall) -> BulkAnswer:
        return BulkAnswer(body=self._recall(decode(NonceRequest, call.body).digest).SerializeToString())

    async def dial_back(self, request: DialBackRequest, context: CallContext) -> DialBackReply:
        """Dials the caller back at the host its call came from, on the ports it names."""
        caller = observed_endpoint(context.peer)
        if caller is None:
            raise InvalidRequest(f"DialBack: the call came from {context.peer}, not an IP address to dial back")
        _check(request)
        done = self._admit(caller.host)
        try:
            remaining = context.time_remaining()
            timeout = DIAL_SECONDS if remaining is None else max(0.1, min(DIAL_SECONDS, remaining - _MARGIN))
            peer_id = request.peer_id or None
            grpc_at = Endpoint(caller.host, request.grpc_port)
            bulk_at = Endpoint(caller.host, request.bulk_port) if request.bulk_port else None
            (grpc_reached, grpc_error), (bulk_reached, bulk_error) = await asyncio.gather(
                self._dial_grpc(grpc_at, peer_id, request.nonce, timeout),
                self._dial_bulk(bulk_at, peer_id, request.nonce, timeout) if bulk_at else _nothing())
        finally:
            done()
        return DialBackReply(grpc_address=str(grpc_at), grpc_reached=grpc_reached, grpc_error=grpc_error,
                             bulk_address=str(bulk_at or ""), bulk_reached=bulk_reached, bulk_error=bulk_error)

    def _admit(self, host: str) -> Callable[[], None]:
        try:
            return self.limits.admit(host)
        except LimitExceeded as e:
            raise LimitExceeded(e.reason, f"DialBack refused: {host} may ask for {DIAL_BACKS_PER_SECOND:g} dial-backs "
                                          f"per second (bursts of {DIAL_BACK_BURST}, {DIAL_BACKS_AT_ONCE} at once), so "
                                          f"that dial-backs cannot be turned against anyone; try again later") from None

    async def _dial_grpc(self, endpoint: Endpoint, peer_id: str | None, nonce: bytes,
                         timeout: float) -> tuple[bool, str]:
        pool = ChannelPool(self.settings, identity=self.identity)  # a fresh connection, not one kept open
        try:
            reply = await RpcClient(pool, DIAL_BACK, endpoint, peer_id=peer_id).call(
                "Nonce", NonceRequest(digest=hashlib.sha256(nonce).digest()), timeout=timeout)
            return _echoed(reply.nonce, nonce, endpoint)
        except WireError as e:
            return False, str(e)
        finally:
            await pool.close()

    async def _dial_bulk(self, endpoint: Endpoint, peer_id: str | None, nonce: bytes,
                         timeout: float) -> tuple[bool, str]:
        client = BulkClient(self.settings, identity=self.identity, max_idle_per_peer=0)
        try:
            body, _ = await client.call(endpoint, NONCE_ROUTE, body=NonceRequest(
                digest=hashlib.sha256(nonce).digest()).SerializeToString(), timeout=timeout, peer_id=peer_id)
            return _echoed(decode(NonceReply, body).nonce, nonce, endpoint)
        except WireError as e:
            return False, str(e)
        finally:
            await client.close()


def _check(request: DialBackRequest) -> None:
    low, high = NONCE_BYTES
    if not low <= len(request.nonce) <= high:
        raise InvalidRequest(f"DialBack: a nonce of {len(request.nonce)} bytes (expected {low} to {high})")
    if not 1 <= request.grpc_port <= 65535 or request.bulk_port > 65535:
        raise InvalidRequest(f"DialBack: grpc_port={request.grpc_port} and bulk_port={request.bulk_port} must be "
                             f"ports (1..65535; bulk 0 for none)")
    if request.peer_id:
        try:
            public_key_from_peer_id(request.peer_id)
        except IdentityError as e:
            raise InvalidRequest(f"DialBack: peer_id: {e}") from None


def _echoed(answer: bytes, nonce: bytes, endpoint: Endpoint) -> tuple[bool, str]:
    return (True, "") if answer == nonce else (False, f"the peer at {endpoint} answered with another nonce")


async def _nothing() -> tuple[bool, str]:
    return False, ""


def _direct_ports(server: RpcServer) -> tuple[int, int]:
    """The gRPC and bulk (0: none) ports the server is dialled at directly, also while it announces relayed ones."""
    grpc, bulk = server.announced, server.announced_bulk
    grpc_port = (server.settings.announce_port or server.port) if grpc.relayed else grpc.port
    if bulk is None or server.bulk is None:
        return grpc_port, 0
    return grpc_port, (server.settings.announce_bulk_port or server.bulk.port) if bulk.relayed else bulk.port


async def check_reachability(server: RpcServer, pool: ChannelPool, peers: Sequence[PeerAddress], *,
                             helpers: int = 2, timeout: float = 5.0) -> ReachabilityReport:
    """Whether peers can dial `server` at its announced gRPC and bulk ports: pings `peers`, takes
    the majority of the hosts they observe, then asks `helpers` random ones that answered (more
    as others fail to answer, within `timeout` seconds in all) to dial it back.

    PUBLIC: at least two helpers reached both ports (gRPC only, without a bulk server);
    BEHIND_NAT: every helper that answered failed; UNKNOWN: fewer than two answered, or they disagree."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    me = server.identity.peer_id
    # a peer reached through a relay sees the relay's splice, not this node: it can neither observe nor dial back
    candidates = list({peer.peer_id or str(peer.endpoint): peer for peer in peers
                       if peer.peer_id != me and not peer.endpoint.relayed}.values())
    pings = await asyncio.gather(*(_ping(pool, peer, deadline - loop.time()) for peer in candidates))
    observed = ObservedAddresses()
    alive: dict[str, PeerAddress] = {}
    for peer, reply in zip(candidates, pings):
        if reply is None or reply.peer_id == me:
            continue
        host = observed_host(reply.observed_address)
        if host is not None:
            observed.report(reply.peer_id, host)
        alive.setdefault(reply.peer_id, PeerAddress(peer.endpoint, peer.peer_id or reply.peer_id or None))
    grpc_port, bulk_port = _direct_ports(server)
    order = random.sample(list(alive.values()), len(alive))
    asked: list[PeerAddress] = []
    answers: list[DialBackReply] = []
    while order and len(answers) < helpers and deadline - loop.time() > 0:
        wave, order = order[: helpers - len(answers)], order[helpers - len(answers):]
        asked += wave
        replies = await asyncio.gather(*(_ask(server, pool, peer, grpc_port, bulk_port, deadline - loop.time())
                                         for peer in wave))
        answers += [reply for reply in replies if reply is not None]
    verdict, detail = _verdict(answers, len(asked), bulk_port != 0)
    return ReachabilityReport(verdict, observed.majority(), detail, time.time(), tuple(str(peer) for peer in asked))


async def _ping(pool: ChannelPool, peer: PeerAddress, timeout: float) -> PingReply | None:
    try:
        return await RpcClient(pool, PROBE, peer.endpoint, peer_id=peer.peer_id).call(
            "Ping", PingRequest(), timeout=max(timeout, 0.01))
    except WireError:
        return None


async def _ask(server: RpcServer, pool: ChannelPool, helper: PeerAddress, grpc_port: int, bulk_port: int,
               timeout: float) -> DialBackReply | None:
    """`helper`'s answer to a DialBack of `server`'s ports; None if it gave none."""
    nonce = os.urandom(32)
    request = DialBackRequest(nonce=nonce, grpc_port=grpc_port, bulk_port=bulk_port, peer_id=server.identity.peer_id)
    with server.dial_backs.awaiting(nonce):
        try:
            return await RpcClient(pool, DIAL_BACK, helper.endpoint, peer_id=helper.peer_id).call(
                "DialBack", request, timeout=max(timeout, 0.01))
        except WireError:
            return None


def _verdict(answers: list[DialBackReply], asked: int, bulk: bool) -> tuple[Verdict, str]:
    def reached(answer: DialBackReply) -> bool:
        return answer.grpc_reached and (answer.bulk_reached or not bulk)

    def failure(answer: DialBackReply) -> str:
        if not answer.grpc_reached:
            return f"{answer.grpc_address} (gRPC): {answer.grpc_error}"
        return f"{answer.bulk_address} (bulk): {answer.bulk_error}"

    ports = " and ".join(a for a in (answers[0].grpc_address, answers[0].bulk_address) if a) if answers else ""
    good = sum(map(reached, answers))
    if good >= 2:
        return Verdict.PUBLIC, f"{good} of {len(answers)} peers dialled this node back at {ports}"
    if len(answers) < 2:
        return Verdict.UNKNOWN, (f"{len(answers)} of the {asked} peers asked answered a dial-back "
                                 f"(2 are needed for a verdict)")
    if good == 0:
        return Verdict.BEHIND_NAT, (f"none of the {len(answers)} peers that answered could dial this node back: "
                                    f"{failure(answers[0])}")
    failed = next(answer for answer in answers if not reached(answer))
    return Verdict.UNKNOWN, (f"peers disagree: {good} of {len(answers)} dialled this node back at {ports}, "
                             f"another could not: {failure(failed)}")

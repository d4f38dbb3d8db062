"""A Kademlia DHT node: the swarm's only directory.

Longer than 400 lines for a reason: it is one object, `DHTNode`, whose operations (join,
`store`/`get` and their batched forms, `find_nearest`, re-pinging) all act on the same routing
table, blacklist, storage and calls to other nodes; what stands alone is in modules of its own
(`protocol`, `traversal`, `reads`, `routing`, `republish`, `messages`, `validation`, `blacklist`).

`DHTNode` is the façade: it serves the DHT protocol (`apiary.dht.Node`: Ping, Store, Find,
answered by `protocol.NodeServicer`) on an `RpcServer`, calls it on other nodes, keeps a
routing table of the nodes it hears from, and offers `store`/`get` (and their batched forms)
to the code of its participant. Keys, subkeys and values are any msgpack-serializable
values; each write has an absolute expiration time. A node in client mode (behind NAT) serves
nothing and is never put in anyone's routing table, but gets and stores like any other.

Nodes dropped from the routing table because they stopped answering are pinged again every
`reping_period` seconds (for `reping_for` seconds); one that answers is back in the table. So
the two sides of a network partition, which drop each other while apart, find each other again
once it heals.

A node new to the routing table is given the records it should now hold (`republish`, section
2.5 of the Kademlia paper).

Hot keys: a node that found a value caches it on the nearest node of its lookup that lacked it
(section 2.3; `storage.cache`), for less time the further that node is from the key; a node
answers from its records and its cached copies, and reports the keys it is asked for far more
than others (`hotkeys`). A dictionary is answered in pages that `get` follows. A record past a
limit (`max_value_bytes`, `max_subkeys`) is refused with the limit named, and `store` raises
`StoreRefused` with it.

Every reply tells the caller where its call came from; `DHTNode.observed` keeps what the nodes
that answer report (`apiary.wire.observed`).

The transport (what makes the client of a call: `RpcClient`) and the clock (`apiary.clock`) are
injected, real by default: the simulator (`tests/sim`) runs the same node in virtual time.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from apiary.clock import REAL, Clock
from apiary.dht.blacklist import Blacklist
from apiary.dht.hotkeys import HotKeys
from apiary.dht.ids import id_of, id_to_bytes, node_id, random_id_in
from apiary.dht.messages import contact_of, merge_entries, node_info
from apiary.dht.protos.dht_pb2 import FindRequest, FindResponse, NodeInfo, PingRequest, StoreItem, StoreRequest
from apiary.dht.protocol import NODE_SERVICE, NodeServicer
from apiary.dht.reads import cache_on_path, fetch_agreed, fetch_value, read_pages
from apiary.dht.replicas import ReplicaCache
from apiary.dht.republish import Republisher
from apiary.dht.routing import Contact, RoutingTable, Unreachable
from apiary.dht.settings import DHTSettings
from apiary.dht.storage import MemoryStorage, Storage, StoredEntry
from apiary.dht.storage.cache import LookupCache
from apiary.dht.traversal import LookupState, traverse
from apiary.dht.validation import DHTRecord, RecordValidator, SignatureValidator
from apiary.wire import (
    AccessDenied,
    ChannelPool,
    DeadlineExceeded,
    Identity,
    PeerAddress,
    PeerUnavailable,
    RpcClient,
    RpcServer,
    WireError,
    WireSettings,
)
from apiary.wire.observed import ObservedAddresses, observed_host

logger = logging.getLogger(__name__)

class DHTBootstrapError(RuntimeError):
    """No initial peer answered, or those that answered refused this node's credentials."""


class StoreRefused(ValueError):
    """A record was refused by every node asked to store it, for a limit its reply names."""


@dataclass(frozen=True)
class Found:
    """A value read from the DHT. For a dictionary, `value` maps each subkey to a `Found`."""

    value: Any
    expiration: float


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)


class DHTMetrics:
    def __init__(self, registry: CollectorRegistry | None, node: DHTNode):
        self.routing_table_size = Gauge(
            "apiary_dht_routing_table_nodes", "Nodes in the routing table", registry=registry
        )
        self.routing_table_size.set_function(lambda: len(node.routing))
        self.unreachable = Gauge(
            "apiary_dht_unreachable_nodes", "Nodes removed as unreachable that are pinged again", registry=registry
        )
        self.unreachable.set_function(lambda: len(node.unreachable))
        self.stored_records = Gauge("apiary_dht_stored_records", "Keys stored on this node", registry=registry)
        self.rejected = Counter(
            "apiary_dht_rejected_records", "Records refused, by reason", ["reason"], registry=registry
        )
        for reason in ("validation", "max_value_bytes", "max_subkeys"):
            self.rejected.labels(reason)  # reads 0 from the start, not no data
        self.served = Counter(
            "apiary_dht_served_keys", "Keys other nodes asked this node for, by what it answered (stored, cached, none)",
            ["answer"], registry=registry,
        )
        self.served_copies = Counter(
            "apiary_dht_served_copies", "Values and dictionary pages this node sent whole in Find answers (a quorum "
            "read agrees on digests and fetches one copy)", registry=registry,
        )
        self.hot_keys = Gauge(
            "apiary_dht_hot_keys", "Keys asked for far more than others (hot_key_factor times the average)",
            registry=registry,
        )
        self.hot_keys.set_function(node.hot_keys.hot)
        self.hot_key_requests = Counter(
            "apiary_dht_hot_key_requests", "Requests answered for keys that were hot then", registry=registry
        )
        self.operations = Histogram(
            "apiary_dht_operation_duration_seconds", "Time of get/store operations", ["operation"], registry=registry
        )
        self.outgoing = Counter(
            "apiary_dht_outgoing_rpcs", "RPCs sent to other nodes, by method and outcome",
            ["method", "outcome"], registry=registry,
        )


class DHTNode:
    """One node of the DHT. Use `DHTNode.launch()` for a standalone node, or `attach()` it to a
    service's RpcServer and then `join()`."""

    def __init__(
        self,
        identity: Identity,
        settings: DHTSettings | None = None,
        *,
        storage: Storage | None = None,
        validator: RecordValidator | None = None,  # default: signed records (SignatureValidator)
        pool: ChannelPool | None = None,
        registry: CollectorRegistry | None = None,
        transport: Callable[..., Any] = RpcClient,  # makes the client of a call to a node (RpcClient's arguments)
        clock: Clock = REAL,
    ):
        self.identity = identity
        self.settings = settings or DHTSettings()
        self.transport = transport
        self.clock = clock
        self.storage = storage or MemoryStorage(clock)
        self.validator = validator if validator is not None else SignatureValidator(identity)
        self.pool = pool or ChannelPool()
        self._pool_given = pool is not None  # else made like the server at attach()
        self.id = node_id(identity.peer_id)
        self.routing = RoutingTable(self.id, self.settings.bucket_size, clock=clock)
        self.unreachable = Unreachable(self.settings.reping_for, clock=clock)
        self.blacklist = Blacklist(clock=clock)
        self.observed = ObservedAddresses()  # where the nodes that answer see this node's calls come from
        self.republisher = Republisher(self)
        self.cache = LookupCache(self.settings.max_cached_keys, clock)
        self.replicas = ReplicaCache(self.settings.replica_cache_ttl, self.settings.num_replicas, clock=clock)
        self.hot_keys = HotKeys(self.settings.hot_key_factor, self.settings.hot_key_half_life, clock=clock)
        self._late: set[str] = set()  # peers whose Find outlived its lookup's deadline and still runs
        self.metrics = DHTMetrics(registry, self)
        self.server: RpcServer | None = None
        self._owns_server = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---- lifecycle ----

    @classmethod
    async def launch(
        cls,
        initial_peers: list[PeerAddress] | None = None,
        *,
        identity: Identity | None = None,
        settings: DHTSettings | None = None,
        wire: WireSettings | None = None,
        **kwargs: Any,
    ) -> DHTNode:
        """Starts a standalone node with its own server (none in client mode) and joins the swarm;
        with a `registry`, its server's RPC metrics go there too (apiary_dht_rpc_*)."""
        wire = wire or WireSettings(listen_host="127.0.0.1", bulk=False)
        identity = identity or Identity.generate()
        node = cls(identity, settings, pool=ChannelPool(wire, identity=identity), **kwargs)
        if not node.settings.client_mode:
            node.attach(RpcServer(wire, node.identity, registry=kwargs.get("registry"), metrics_prefix="apiary_dht"))
            node._owns_server = True
            await node.server.start()
        try:
            await node.join(initial_peers or [])
        except BaseException:
            await node.shutdown()
            raise
        return node

    def attach(self, server: RpcServer) -> None:
        """Serves the DHT protocol on `server` (call before the server starts). The node dials as
        the server serves: a pool given at construction must agree with it (SettingsMismatch)."""
        if self.settings.client_mode:
            raise ValueError("a client-mode DHT node serves nothing")
        if self._pool_given:
            self.pool.check_matches(server.settings, "the DHT node")
        else:
            self.pool = ChannelPool.like(server)
        self.server = server
        server.add_service(NODE_SERVICE, NodeServicer(self))

    @property
    def contact(self) -> Contact | None:
        """How others reach this node (None in client mode, also when switched to it while serving)."""
        if self.server is None or self.settings.client_mode:
            return None
        return Contact(self.identity.peer_id, self.server.announced)

    @property
    def address(self) -> str:
        """The value others should pass as --initial-peers (empty in client mode)."""
        return f"{self.identity.peer_id}@{self.contact.endpoint}" if self.contact is not None else ""

    async def join(self, initial_peers: list[PeerAddress]) -> None:
        """Contacts the initial peers (at least one must answer) and fills the routing table."""
        if initial_peers:
            failures = await asyncio.gather(*(self._ping_address(peer) for peer in initial_peers))
            if all(failures):
                raise DHTBootstrapError(self._bootstrap_failure(initial_peers, failures))
            await self.find_nearest([self.id])  # joining, section 2.3: a lookup of our own id
        self._spawn(self._refresh_loop())
        self._spawn(self._reping_loop())
        self._spawn(self.republisher.run())

    async def shutdown(self) -> None:
        """Cancels background work, stops the server this node started, closes storage and channels."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_server and self.server is not None:
            await self.server.stop(0)
        await self.pool.close()
        await self.storage.close()

    def _spawn(self, coroutine: Any) -> asyncio.Future[Any]:
        """Runs `coroutine` as a task of the node's (cancelled at shutdown)."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("DHT background task failed: %r", task.exception())

    async def _refresh_loop(self) -> None:
        """Section 2.3: a bucket no lookup went through for `refresh_period` is refreshed by a
        lookup of a random id in its range."""
        period = self.settings.refresh_period
        while True:
            await asyncio.sleep(min(period / 2, 30.0))
            self.metrics.stored_records.set(await self.storage.count())
            stale = self.routing.stale_buckets(period)
            if stale:
                await self.find_nearest([random_id_in(b.low, b.high) for b in stale])

    async def _reping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reping_period)
            await self.reping()

    async def reping(self) -> int:
        """Pings the nodes removed as unreachable; those that answer are back in the routing
        table. Returns how many answered."""
        answers = await asyncio.gather(*(self._ping_again(contact) for contact in self.unreachable.contacts()))
        return sum(answers)

    async def _ping_again(self, contact: Contact) -> bool:
        # through a new channel: the one whose calls failed may be waiting out gRPC's reconnect
        # backoff (minutes, after a long partition) and would fail this call without trying
        await self.pool.discard(contact.endpoint)
        return await self._call(contact, "Ping", PingRequest(sender=self._me())) is not None

    # ---- the protocol: what the servicer (`protocol`) and the calls below share ----

    def _add(self, contact: Contact) -> None:
        """Adds a node to the routing table; a node new to it may get records (section 2.5)."""
        known = self.routing.get(contact.peer_id) is not None
        if self.routing.add(contact) and not known:
            self.republisher.notice(contact)
            self.replicas.notice(contact)

    def _me(self) -> NodeInfo:
        contact = self.contact
        return node_info(contact) if contact is not None else NodeInfo(peer_id=self.identity.peer_id)

    async def _store_local(self, item: StoreItem) -> tuple[bool, str]:
        """Stores one record; whether it was, and the limit it broke ("" if none)."""
        subkey = item.subkey if item.has_subkey else None
        key_id = id_to_bytes(id_of(item.key))
        refused = await self._over_limit(key_id, subkey, item.value)
        if refused:
            self.metrics.rejected.labels(refused.split("=")[0]).inc()
            return False, refused
        if not self._valid(item):
            return False, ""
        stored = await self.storage.store(key_id, subkey, item.value, item.expiration)
        if stored:
            self.republisher.remember(key_id, item.key)
        return stored, ""

    async def _cache_local(self, item: StoreItem, keep_for: float) -> bool:
        """Caches a copy of another node's record for at most `keep_for` seconds (section 2.3)."""
        subkey = item.subkey if item.has_subkey else None
        key_id = id_to_bytes(id_of(item.key))
        if await self._over_limit(key_id, subkey, item.value, cached=True) or not self._valid(item):
            return False
        return self.cache.store(key_id, subkey, item.value, item.expiration, keep_for)

    def _valid(self, item: StoreItem) -> bool:
        subkey = item.subkey if item.has_subkey else None
        if self.validator is None or self.validator.validate(DHTRecord(item.key, subkey, item.value, item.expiration)):
            return True
        self.metrics.rejected.labels("validation").inc()
        return False

    async def _over_limit(self, key_id: bytes, subkey: bytes | None, value: bytes, *, cached: bool = False) -> str:
        """The limit a record breaks ("" if none): its size, or a new subkey past `max_subkeys`."""
        if len(value) > self.settings.max_value_bytes:
            return f"max_value_bytes={self.settings.max_value_bytes}"
        if subkey is not None:
            current = self.cache.get(key_id) if cached else await self.storage.get(key_id)
            if current is not None and len(current.subkeys) >= self.settings.max_subkeys and subkey not in current.subkeys:
                return f"max_subkeys={self.settings.max_subkeys}"
        return ""

    async def _held(self, key_id: bytes) -> StoredEntry | None:
        """What this node holds for a key: its records merged with its cached copies."""
        return merge_entries([e for e in (await self.storage.get(key_id), self.cache.get(key_id)) if e is not None])

    async def _answer(self, key_id: bytes) -> tuple[StoredEntry | None, bool]:
        """What a Find of a key gets from this node, and whether the node stores records of the
        key (not only a cached copy); counts the request (hot keys, metrics)."""
        stored = await self.storage.get(key_id)
        cached = self.cache.get(key_id)
        if self.hot_keys.seen(key_id):
            self.metrics.hot_key_requests.inc()
        self.metrics.served.labels("stored" if stored else "cached" if cached else "none").inc()
        return merge_entries([e for e in (stored, cached) if e is not None]), stored is not None

    # ---- the protocol, called ----

    async def _call(self, contact: Contact, method: str, request: Any) -> Any | None:
        """Calls another node; a failure blacklists it for a while and returns None."""
        client = self.transport(self.pool, NODE_SERVICE, contact.endpoint, timeout=self.settings.rpc_timeout,
                           peer_id=contact.peer_id)
        try:
            response = await client.call(method, request)
        except (PeerUnavailable, DeadlineExceeded) as e:  # gone or too slow: avoid it for a while
            logger.debug("%s to %s failed: %s", method, contact.peer_id[:8], e)
            self.metrics.outgoing.labels(method, "unreachable").inc()
            self.blacklist.failed(contact.peer_id)
            if self.routing.remove(contact.peer_id, contact.id):
                self.unreachable.add(contact)  # asked again later (reping): it may be cut off, not gone
            return None
        except WireError as e:  # alive but refused or failed this request: keep it
            logger.info("%s to %s was refused: %s", method, contact.peer_id[:8], e)
            self.metrics.outgoing.labels(method, "refused").inc()
            return None
        self.metrics.outgoing.labels(method, "ok").inc()
        if response.node.peer_id != contact.peer_id:
            self.blacklist.failed(contact.peer_id)
            self.routing.remove(contact.peer_id, contact.id)
            self.unreachable.discard(contact.peer_id)
            return None
        self.blacklist.succeeded(contact.peer_id)
        self._observed_by(contact.peer_id, response)
        self._add(contact)
        self.unreachable.discard(contact.peer_id)
        return response

    async def _ping_address(self, peer: PeerAddress) -> WireError | str | None:
        """Pings an initial peer and adds it to the routing table; None, else why it failed (the
        WireError raised, or what was wrong with its answer)."""
        client = self.transport(self.pool, NODE_SERVICE, peer.endpoint, timeout=self.settings.bootstrap_timeout,
                           peer_id=peer.peer_id)
        try:
            response = await client.call("Ping", PingRequest(sender=self._me()))
        except WireError as e:
            logger.info("initial peer %s did not answer: %s", peer, e)
            return e
        if peer.peer_id and response.node.peer_id != peer.peer_id:
            logger.warning("initial peer %s answered as %s", peer, response.node.peer_id)
            return f"it answered as {response.node.peer_id}"
        contact = contact_of(response.node) or Contact(response.node.peer_id, peer.endpoint)
        self._observed_by(contact.peer_id, response)
        self._add(Contact(contact.peer_id, peer.endpoint))
        return None

    def _observed_by(self, peer_id: str, response: Any) -> None:
        """Notes where the node `peer_id` saw this node's call come from (its reply says)."""
        host = observed_host(response.observed_address)
        if host is not None:
            self.observed.report(peer_id, host)

    def _bootstrap_failure(self, peers: list[PeerAddress], failures: list[WireError | str | None]) -> str:
        """Why joining failed: the refusals of the peers that answered, else why none answered."""
        refusals = [str(failure) for failure in failures if isinstance(failure, AccessDenied)]
        if refusals:
            return "the initial peers answered but refused this node's credentials: " + "; ".join(refusals)
        listed = "; ".join(f"{peer} ({failure})" for peer, failure in zip(peers, failures))
        return f"none of the initial peers answered within {self.settings.bootstrap_timeout:.0f}s: {listed}"

    async def _find(self, contact: Contact, key_ids: list[int], *, digests: bool = False) -> FindResponse | None:
        """One Find per max_items_per_request ids (a node refuses larger ones); None if any fails.
        `digests`: found values answered as digests (a quorum read)."""
        limit = self.settings.max_items_per_request
        responses = await asyncio.gather(*(
            self._call(contact, "Find", FindRequest(sender=self._me(), key_ids=[id_to_bytes(k) for k in key_ids[i : i + limit]],
                                                    digests=digests))
            for i in range(0, len(key_ids), limit)
        ))
        if not responses or any(response is None for response in responses):
            return None
        if len(responses) == 1:
            return responses[0]
        return FindResponse(node=responses[0].node, results=[r for response in responses for r in response.results])

    async def _lookup(self, key_ids: list[int], *, stop_at_first_value: bool = False, quorum: int | None = None,
                      deadline: float | None = None) -> dict[int, LookupState]:
        """Section 2.3's node lookup (`alpha` = parallelism), for many ids at once (`traversal`)."""
        return await traverse(
            key_ids,
            lambda key_id: [c for c in self.routing.nearest(key_id, self.settings.bucket_size)
                            if c.peer_id not in self._late],
            functools.partial(self._find, digests=quorum is not None),
            k=self.settings.bucket_size,
            parallelism=self.settings.parallelism,
            own_peer_id=self.identity.peer_id,
            skip=lambda peer_id: peer_id in self._late or self.blacklist.banned(peer_id),
            stop_at_first_value=stop_at_first_value,
            quorum=quorum,
            deadline=deadline,
            detach=self._let_finish,
            fetch=(lambda contact, key_id: self._spawn(fetch_value(self, contact, key_id))) if quorum is not None else None,
            now=self.clock.monotonic,
        )

    def _let_finish(self, contact: Contact, query: asyncio.Future[FindResponse | None]) -> None:
        """A Find still running at its lookup's deadline runs on to its own (its failure bans the
        peer); until it ends, other lookups skip the peer instead of waiting for it again."""
        self._late.add(contact.peer_id)
        query.add_done_callback(lambda _: self._late.discard(contact.peer_id))
        self._spawn(query)

    async def find_nearest(self, key_ids: list[int], count: int | None = None, *, deadline: float | None = None
                           ) -> dict[int, list[Contact]]:
        """The `count` (default k) nearest live nodes to each id, this node included unless in client
        mode (with a `deadline`, on the clock's monotonic time: the nearest found by then)."""
        count = count or self.settings.bucket_size
        states = await self._lookup(key_ids, deadline=deadline)
        result = {}
        for key_id, state in states.items():
            if self.contact is not None:
                state.candidates[self.identity.peer_id] = self.contact
                state.answered.add(self.identity.peer_id)
            result[key_id] = state.nearest(count, answered_only=True)
        return result

    # ---- the public API ----

    async def store(self, key: Any, value: Any, expiration: float, subkey: Any = None) -> bool:
        """Stores `value` under `key` (and `subkey`) until `expiration`; True if any replica took it."""
        return (await self.store_many([(key, subkey, value, expiration)]))[0]

    async def store_many(self, items: list[tuple[Any, Any, Any, float]], *, timeout: float | None = None) -> list[bool]:
        """Stores (key, subkey or None, value, expiration) items on the nodes nearest to each key,
        one Store RPC per node; returns, per item, whether at least one node accepted it. A key
        stored on less than `replica_cache_ttl` seconds ago goes to the nodes found then
        (`replicas`); an item none of them took is stored again after a lookup. With a
        `timeout`, the lookups and the stores end in that many seconds on the nodes found and the
        answers given by then (stores still running go on in the background)."""
        started = time.perf_counter()
        deadline = None if timeout is None else self.clock.monotonic() + timeout
        records = [self._signed_record(key, subkey, value, expiration) for key, subkey, value, expiration in items]
        key_ids = [id_of(record.key) for record in records]
        nearest, reused = await self._replicas_of(set(key_ids), deadline, reuse=True)
        accepted, refused = await self._store_on(records, [nearest[key_id] for key_id in key_ids], deadline)
        again = [i for i, key_id in enumerate(key_ids) if key_id in reused and not accepted[i] and i not in refused]
        if again and (deadline is None or self.clock.monotonic() < deadline):
            fresh, _ = await self._replicas_of({key_ids[i] for i in again}, deadline, reuse=False)
            outcomes, reasons = await self._store_on([records[i] for i in again], [fresh[key_ids[i]] for i in again],
                                                     deadline)
            for position, index in enumerate(again):
                accepted[index] = outcomes[position]
                if position in reasons:
                    refused[index] = reasons[position]
        self.metrics.operations.labels("store").observe(time.perf_counter() - started)
        over = {index: reason for index, reason in refused.items() if not accepted[index]}
        if over:
            raise StoreRefused("refused by every node asked, past a limit: " + "; ".join(
                f"key {items[index][0]!r}" + ("" if items[index][1] is None else f" subkey {items[index][1]!r}")
                + f": {reason}" for index, reason in sorted(over.items())[:8]))
        return accepted

    async def _replicas_of(self, key_ids: set[int], deadline: float | None, *, reuse: bool
                           ) -> tuple[dict[int, list[Contact]], set[int]]:
        """The nodes to store each key on, and the keys whose nodes were reused (`replicas`, none
        of them banned since) rather than looked up."""
        nearest: dict[int, list[Contact]] = {}
        for key_id in key_ids if reuse else ():
            contacts = self.replicas.get(key_id)
            if contacts is not None and not any(self.blacklist.banned(c.peer_id) for c in contacts):
                nearest[key_id] = contacts
        reused = set(nearest)
        unknown = sorted(key_ids - reused)
        if unknown:
            found = await self.find_nearest(unknown, self.settings.num_replicas, deadline=deadline)
            if deadline is None or self.clock.monotonic() < deadline:  # the lookups ended, not their deadline
                for key_id, contacts in found.items():
                    self.replicas.put(key_id, contacts)
            nearest.update(found)
        return nearest, reused

    async def _store_on(self, records: list[DHTRecord], nodes: list[list[Contact]], deadline: float | None
                        ) -> tuple[list[bool], dict[int, str]]:
        """Stores each record on its nodes, one Store RPC per node: per record, whether a node
        accepted it, and the limit a node named in refusing it (by record)."""
        by_node: dict[str, tuple[Contact, list[int]]] = {}
        for index, contacts in enumerate(nodes):
            for contact in contacts:
                by_node.setdefault(contact.peer_id, (contact, []))[1].append(index)
        accepted = [False] * len(records)
        refused: dict[int, str] = {}

        async def store_on(contact: Contact, indices: list[int]) -> None:
            if contact.peer_id == self.identity.peer_id:
                outcomes = [await self._store_local(_item_of(records[i])) for i in indices]
            else:
                outcomes = []
                for batch in self._batches([records[i] for i in indices]):  # a node refuses larger requests
                    request = StoreRequest(sender=self._me(), items=batch)
                    response = await self._call(contact, "Store", request)
                    if response is None:
                        self.replicas.failed(contact.peer_id)
                        outcomes += [(False, "")] * len(batch)
                    else:
                        reasons = list(response.refused) + [""] * (len(batch) - len(response.refused))
                        outcomes += list(zip(response.stored, reasons))
            for index, (outcome, reason) in zip(indices, outcomes):
                accepted[index] = accepted[index] or outcome
                if reason:
                    refused[index] = reason

        if not by_node and self.contact is None:
            logger.warning("client-mode node knows no other node: nothing stored")
        stores = [asyncio.ensure_future(store_on(contact, indices)) for contact, indices in by_node.values()]
        if stores:
            remaining = None if deadline is None else max(0.0, deadline - self.clock.monotonic())
            try:
                done, running = await asyncio.wait(stores, timeout=remaining)
            except asyncio.CancelledError:
                for store in stores:
                    store.cancel()
                raise
            for store in done:
                store.result()  # (a failure of this node's own, not of a peer's: raised, as ever)
            for store in running:  # past the deadline: they end on their own RPC deadline
                self._spawn(store)
        return accepted, refused

    async def get(self, key: Any, latest: bool = False, *, timeout: float | None = None) -> Found | None:
        """The value under `key`, or None. With `latest`, searches the key's nearest nodes for the
        newest value instead of returning the first one found, until `read_quorum` nodes agree on
        it (one of them storing it: `traversal`) or its nearest nodes are all asked. With `timeout`, the
        search ends after that many seconds with what it found (a frozen node is not waited for)."""
        return (await self.get_many([key], latest=latest, timeout=timeout))[0]

    async def get_many(self, keys: list[Any], latest: bool = False, *, timeout: float | None = None
                       ) -> list[Found | None]:
        """`get` for many keys at once: one lookup, one Find RPC per node per round. A dictionary
        answered in pages is read on from the nodes that paged it (`reads`)."""
        started = time.perf_counter()
        deadline = None if timeout is None else self.clock.monotonic() + timeout
        raw_keys = [pack(key) for key in keys]
        key_ids = [id_of(raw) for raw in raw_keys]
        local = {key_id: await self._held(id_to_bytes(key_id)) for key_id in key_ids}
        wanted = [key_id for key_id in set(key_ids) if latest or local[key_id] is None]
        quorum = self.settings.read_quorum if latest else None
        states = await self._lookup(wanted, stop_at_first_value=not latest, quorum=quorum, deadline=deadline) if wanted else {}
        if quorum is not None:
            await asyncio.gather(*(fetch_agreed(self, state, deadline) for state in states.values()))
        complete = {key_id: await read_pages(self, state, deadline) for key_id, state in states.items()}
        results = []
        for raw_key, key_id in zip(raw_keys, key_ids):
            state = states.get(key_id)
            entries = [entry for entry, _ in state.values] if state else []
            if local[key_id] is not None:
                entries.append(local[key_id])
            merged = merge_entries([e for e in (self._validated(raw_key, entry) for entry in entries) if e])
            if merged is not None and state is not None and complete[key_id] and self.settings.cache_on_lookup:
                cache_on_path(self, raw_key, merged, state)
            results.append(self._decoded(raw_key, merged))
        self.metrics.operations.labels("get").observe(time.perf_counter() - started)
        return results

    def _batches(self, records: list[DHTRecord]) -> list[list[StoreItem]]:
        """Store items in requests of at most max_items_per_request items and about half the
        largest gRPC message."""
        max_items, max_bytes = self.settings.max_items_per_request, self.pool.settings.max_message_bytes // 2
        batches: list[list[StoreItem]] = []
        size = 0
        for record in records:
            item = _item_of(record)
            item_bytes = item.ByteSize()
            if not batches or len(batches[-1]) >= max_items or size + item_bytes > max_bytes:
                batches.append([])
                size = 0
            batches[-1].append(item)
            size += item_bytes
        return batches

    # ---- values in and out ----

    def _signed_record(self, key: Any, subkey: Any, value: Any, expiration: float) -> DHTRecord:
        record = DHTRecord(pack(key), None if subkey is None else pack(subkey), pack(value), float(expiration))
        if self.validator is not None:
            record = DHTRecord(record.key, record.subkey, self.validator.sign_value(record), record.expiration)
        if len(record.value) > self.settings.max_value_bytes:
            raise StoreRefused(
                f"value of {len(record.value)} bytes (signed) for key {key!r} exceeds max_value_bytes="
                f"{self.settings.max_value_bytes}"
            )
        return record

    def _validated(self, raw_key: bytes, entry: StoredEntry) -> StoredEntry | None:
        """The entry without records that fail validation (None if nothing is left)."""
        if self.validator is None:
            return entry
        if entry.value is not None:
            record = DHTRecord(raw_key, None, entry.value.value, entry.value.expiration)
            return entry if self.validator.validate(record) else None
        kept = {
            subkey: item for subkey, item in entry.subkeys.items()
            if self.validator.validate(DHTRecord(raw_key, subkey, item.value, item.expiration))
        }
        return StoredEntry(subkeys=kept) if kept else None

    def _decoded(self, raw_key: bytes, entry: StoredEntry | None) -> Found | None:
        if entry is None:
            return None
        strip = self.validator.strip_value if self.validator is not None else (lambda record: record.value)
        if entry.value is not None:
            value = strip(DHTRecord(raw_key, None, entry.value.value, entry.value.expiration))
            return Found(unpack(value), entry.value.expiration)
        return Found(
            {
                unpack(subkey): Found(unpack(strip(DHTRecord(raw_key, subkey, item.value, item.expiration))), item.expiration)
                for subkey, item in entry.subkeys.items()
            },
            entry.expiration,
        )


def _item_of(record: DHTRecord) -> StoreItem:
    return StoreItem(
        key=record.key,
        has_subkey=record.subkey is not None,
        subkey=record.subkey or b"",
        value=record.value,
        expiration=record.expiration,
    )


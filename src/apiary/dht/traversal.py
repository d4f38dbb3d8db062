"""Iterative parallel Kademlia lookups for many keys at once (the node lookup of section 2.3 of
the paper, `parallelism` being its alpha).

Each round, every unfinished key picks up to `parallelism` of its nearest unqueried
candidates; the picks are grouped by node so that each node gets one Find RPC carrying every
key it was picked for, and all of a round's RPCs run concurrently. A key is finished when its
`k` nearest known nodes have all answered or failed, or (when only a value is wanted) as soon
as one value is found, or (when the newest value is wanted, with a `quorum`) as soon as
`quorum` nodes gave the same newest value, at least one of them a node that stores the key's
records: a cached copy alone never ends a read, and a stale one makes it go on. Such a lookup
asks, once it found a value, only as many nodes at once as could complete the quorum
(`LookupState.missing`), so that a read that met cached copies on its way asks one storing
node, not `parallelism`. Nodes answer a quorum read with digests of what they hold (and a few
nearest nodes, not k), so that agreeing costs a few bytes a node: the read then fetches each
content it needs once, from one of the nodes that hold it (`reads.fetch_agreed`). A lookup with a `deadline` finishes then on the answers it has: a node
that is slow or frozen does not hold it for the whole RPC timeout; the queries still running
are handed to `detach` (which lets them end on their own deadline, so that the node learns
that the peer failed) or cancelled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from apiary.dht.ids import distance
from apiary.dht.messages import contact_of, merge_entries, stored_entry
from apiary.dht.protos.dht_pb2 import FindResponse, FoundValue
from apiary.dht.routing import Contact
from apiary.dht.storage import StoredEntry

Query = Callable[[Contact, list[int]], Awaitable[FindResponse | None]]


@dataclass
class LookupState:
    """What a lookup learned about one key."""

    key_id: int
    candidates: dict[str, Contact] = field(default_factory=dict)
    queried: set[str] = field(default_factory=set)
    answered: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    values: list[tuple[StoredEntry, Contact]] = field(default_factory=list)
    without_value: list[Contact] = field(default_factory=list)
    paged: list[Contact] = field(default_factory=list)  # answered a first page of a dictionary: more follow
    stored: set[str] = field(default_factory=set)  # answered with records they store, not only cached copies
    digests: dict[str, tuple[bytes, float]] = field(default_factory=dict)  # a quorum read's answers: by node,
    # the digest of what it holds and its newest expiration
    early: tuple[bytes, str, asyncio.Future[FoundValue | None]] | None = None  # the fetch started at the first
    # digest of a storing node: its digest, the node, the value
    done: bool = False

    @property
    def found(self) -> bool:
        return bool(self.values or self.digests)

    def nearest(self, count: int, *, answered_only: bool = False) -> list[Contact]:
        pool = [c for c in self.candidates.values() if c.peer_id not in self.failed]
        if answered_only:
            pool = [c for c in pool if c.peer_id in self.answered]
        return sorted(pool, key=lambda c: distance(c.id, self.key_id))[:count]

    def stale(self) -> list[Contact]:
        """The nodes that answered with less than the newest value found."""
        newest = merge_entries([entry for entry, _ in self.values])
        return [contact for entry, contact in self.values if entry != newest]

    def agreeing(self) -> set[str]:
        """The nodes that answered the newest content: the newest digest (the most nodes among
        equally new ones), or the values equal to all values merged."""
        if self.digests:
            newest = max(self.groups().items(), key=lambda group: (group[1][0], len(group[1][1])))
            return set(newest[1][1])
        newest_entry = merge_entries([entry for entry, _ in self.values])
        return {contact.peer_id for entry, contact in self.values if entry == newest_entry}

    def groups(self) -> dict[bytes, tuple[float, list[str]]]:
        """The digests answered: each with its newest expiration and the nodes that answered it."""
        groups: dict[bytes, tuple[float, list[str]]] = {}
        for peer_id, (digest, newest) in self.digests.items():
            groups.setdefault(digest, (newest, []))[1].append(peer_id)
        return groups

    def missing(self, quorum: int) -> int:
        """How many more answers could make `quorum` nodes agree on the newest value found, one
        of them a node storing it (0: they do)."""
        agreeing = self.agreeing()
        if agreeing & self.stored:
            return max(0, quorum - len(agreeing))
        return max(1, quorum - len(agreeing))


async def traverse(
    key_ids: list[int],
    seeds: Callable[[int], list[Contact]],
    query: Query,
    *,
    k: int,
    parallelism: int,
    own_peer_id: str,
    skip: Callable[[str], bool],
    stop_at_first_value: bool = False,
    quorum: int | None = None,
    max_rounds: int = 64,
    deadline: float | None = None,
    detach: Callable[[Contact, asyncio.Future[FindResponse | None]], object] | None = None,
    fetch: Callable[[Contact, int], Awaitable[FoundValue | None]] | None = None,
    now: Callable[[], float] = time.monotonic,
) -> dict[int, LookupState]:
    """Runs the lookups; `seeds(id)` gives the starting contacts, `skip(peer_id)` banned ones.
    `quorum`: end a key's lookup once that many nodes agree on its newest value (`missing`);
    `fetch(contact, id)`: the value of a key at a node, started as soon as the first node that
    stores the key answers its digest (`LookupState.early`), so that agreeing on digests costs
    no round trip more.
    `deadline` (on the clock `now`): when to finish on the answers so far; `detach(contact, query)`
    takes each query still running then (default: they are cancelled)."""
    states = {key_id: LookupState(key_id, {c.peer_id: c for c in seeds(key_id)}) for key_id in key_ids}
    for _ in range(max_rounds):
        picks: dict[str, tuple[Contact, list[int]]] = {}
        for state in states.values():
            if state.done:
                continue
            wave = parallelism if quorum is None or not state.found else min(parallelism, state.missing(quorum))
            if state.found and (stop_at_first_value or wave == 0):
                state.done = True
                continue
            pending = [c for c in state.nearest(k) if c.peer_id not in state.queried]
            if not pending:
                state.done = True
                continue
            for contact in pending[:wave]:
                state.queried.add(contact.peer_id)
                picks.setdefault(contact.peer_id, (contact, []))[1].append(state.key_id)
        if not picks:
            break
        queries = {asyncio.ensure_future(query(contact, ids)): (contact, ids) for contact, ids in picks.values()}
        running = set(queries)
        try:
            while running:
                remaining = None if deadline is None else deadline - now()
                if remaining is not None and remaining <= 0:
                    break
                done, running = await asyncio.wait(running, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    _learn(states, *queries[task], task.result(), own_peer_id, skip, fetch)
        finally:
            for task in running:
                if detach is not None:
                    detach(queries[task][0], task)
                else:
                    task.cancel()
        if running:  # the deadline came
            break
    return states


def _learn(states: dict[int, LookupState], contact: Contact, ids: list[int], response: FindResponse | None,
           own_peer_id: str, skip: Callable[[str], bool],
           fetch: Callable[[Contact, int], Awaitable[FoundValue | None]] | None) -> None:
    """Takes in one node's answer (None: it failed) for the keys it was asked about."""
    for position, key_id in enumerate(ids):
        state = states[key_id]
        if response is None or position >= len(response.results):
            state.failed.add(contact.peer_id)
            continue
        state.answered.add(contact.peer_id)
        result = response.results[position]
        entry = stored_entry(result.value)
        if result.value.found and result.value.digest:
            state.digests[contact.peer_id] = (result.value.digest, result.value.expiration)
            if fetch is not None and state.early is None and result.value.stored:
                state.early = (result.value.digest, contact.peer_id, asyncio.ensure_future(fetch(contact, key_id)))
        elif entry is not None:
            state.values.append((entry, contact))
            if result.value.more:
                state.paged.append(contact)
        else:
            state.without_value.append(contact)
        if result.value.found and result.value.stored:
            state.stored.add(contact.peer_id)
        for info in result.nearest:
            found = contact_of(info)
            if found is not None and found.peer_id != own_peer_id and not skip(found.peer_id):
                state.candidates.setdefault(found.peer_id, found)

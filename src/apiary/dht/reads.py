"""What a get does after its lookup (`DHTNode.get_many`): fetching what the nodes of a quorum
read agreed on (`fetch_agreed`), reading on the dictionaries that nodes answered in pages
(`read_pages`), and caching what it found on the lookup's path (`cache_on_path`,
section 2.3 of the Kademlia paper). Both call other nodes through the node's own calls.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from apiary.dht.ids import id_to_bytes
from apiary.dht.messages import entry_digest, records_of, stored_entry
from apiary.dht.protos.dht_pb2 import FindRequest, StoreRequest
from apiary.dht.storage import StoredEntry
from apiary.dht.traversal import LookupState

if TYPE_CHECKING:
    from apiary.dht.node import DHTNode

MAX_FETCHED = 3  # contents a quorum read fetches at most (the newest first)
FETCH_TRIES = 2  # nodes asked at most for one content


async def fetch_agreed(node: DHTNode, state: LookupState, deadline: float | None) -> None:
    """After a quorum read's lookup: fetches each content the nodes answered as a digest, newest
    first, `MAX_FETCHED` at most (a liar's digests cannot make a read fetch more), from one of
    its nodes chosen at random (the load of a hot key spread over its holders), another of them
    if that one fails; adds it to `state.values` for every node that answered its digest (a
    content that changed in between, for the node fetched from alone)."""
    groups = sorted(state.groups().items(), key=lambda group: group[1][0], reverse=True)[:MAX_FETCHED]
    contacts = {c.peer_id: c for c in state.candidates.values()}
    for digest, (_, holders) in groups:
        for peer_id in random.sample(holders, min(len(holders), FETCH_TRIES)):
            if deadline is not None and node.clock.monotonic() >= deadline:
                return
            contact = contacts[peer_id]
            request = FindRequest(sender=node._me(), key_ids=[id_to_bytes(state.key_id)], value_only=True)
            response = await node._call(contact, "Find", request)
            entry = stored_entry(response.results[0].value) if response is not None and response.results else None
            if entry is None:
                continue
            same = entry_digest(entry) == digest
            state.values += [(entry, contacts[holder]) for holder in (holders if same else [peer_id])]
            if response.results[0].value.more:
                state.paged.append(contact)
            break


async def read_pages(node: DHTNode, state: LookupState, deadline: float | None) -> bool:
    """Reads on the dictionaries that nodes answered in pages, each page a Find of its own
    deadline, until the last page or `max_get_bytes` in all (or the get's deadline); adds the
    pages to `state.values`. Whether every paged answer was read to its end."""
    budget = node.settings.max_get_bytes - sum(entry_size(entry) for entry, _ in state.values)
    complete = True
    for contact in state.paged:
        entry = next(entry for entry, c in reversed(state.values) if c.peer_id == contact.peer_id)
        more = True
        while more and budget > 0 and (deadline is None or node.clock.monotonic() < deadline):
            request = FindRequest(sender=node._me(), key_ids=[id_to_bytes(state.key_id)], after=[max(entry.subkeys)])
            response = await node._call(contact, "Find", request)
            if response is None or not response.results or not response.results[0].value.subkeys:
                break
            entry = stored_entry(response.results[0].value)
            more = response.results[0].value.more
            state.values.append((entry, contact))
            budget -= entry_size(entry)
        complete = complete and not more
    return complete


def cache_on_path(node: DHTNode, raw_key: bytes, entry: StoredEntry, state: LookupState) -> None:
    """Section 2.3, caching: the nearest queried node that answered without the value (or with
    an older one) is given a copy, so that later lookups of a popular key end there. The copy
    lives `cache_ttl` seconds if no other node is between it and the key's `num_replicas`
    nearest, halved for each node between ("exponentially inversely proportional to the number
    of nodes between the current node and the node whose ID is closest to the key ID"), and
    never past the record's own expiration."""
    lacking = state.without_value + state.stale()
    if not lacking:
        return
    target = min(lacking, key=lambda c: c.id ^ state.key_id)
    nearer = sum(1 for c in state.candidates.values()
                 if c.peer_id not in state.failed and c.id ^ state.key_id < target.id ^ state.key_id)
    keep_for = node.settings.cache_ttl * 0.5 ** max(0, nearer - node.settings.num_replicas)
    for batch in node._batches(records_of(raw_key, entry)):
        request = StoreRequest(sender=node._me(), items=batch, cache_for=keep_for)
        node._spawn(node._call(target, "Store", request))


def entry_size(entry: StoredEntry) -> int:
    """About how many bytes an entry takes."""
    if entry.value is not None:
        return len(entry.value.value)
    return sum(len(subkey) + len(item.value) for subkey, item in entry.subkeys.items())

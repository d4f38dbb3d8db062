"""What a get does after its lookup (`DHTNode.get_many`): fetching what the nodes of a quorum
read agreed on (`fetch_agreed`), reading on the dictionaries that nodes answered in pages
(`read_pages`), and caching what it found on the lookup's path (`cache_on_path`,
section 2.3 of the Kademlia paper). Both call other nodes through the node's own calls.
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING

from apiary.dht.ids import id_to_bytes
from apiary.dht.messages import entry_digest, records_of, stored_entry
from apiary.dht.protos.dht_pb2 import FindRequest, FoundValue, StoreRequest
from apiary.dht.routing import Contact
from apiary.dht.storage import StoredEntry
from apiary.dht.traversal import LookupState

if TYPE_CHECKING:
    from apiary.dht.node import DHTNode

MAX_FETCHED = 3  # contents a quorum read fetches at most (the newest first)
FETCH_TRIES = 2  # nodes asked at most for one content


async def fetch_agreed(node: DHTNode, state: LookupState, deadline: float | None) -> None:
    """After a quorum read's lookup: the contents the nodes answered as digests, newest first,
    `MAX_FETCHED` at most (a liar's digests cannot make a read fetch more), each from one of its
    nodes: the one whose value the lookup fetched early (`LookupState.early`), else one chosen at
    random (the load of a hot key spread over its holders), another if that one fails; added to
    `state.values` for every node that answered its digest (a content that changed in between,
    for the node fetched from alone). Nothing is waited for past the `deadline` (an early fetch
still running is a task of the node's: it ends on its own RPC deadline)."""
    groups = sorted(state.groups().items(), key=lambda group: group[1][0], reverse=True)[:MAX_FETCHED]
    contacts = {c.peer_id: c for c in state.candidates.values()}
    early = state.early
    for digest, (_, holders) in groups:
        tries = [early[1]] if early is not None and early[0] == digest else []
        tries += random.sample([h for h in holders if h not in tries], min(len(holders), FETCH_TRIES) - len(tries))
        for peer_id in tries:
            if early is not None and peer_id == early[1] and early[0] == digest:
                found = await _until(early[2], node, deadline)
            elif deadline is None or node.clock.monotonic() < deadline:
                found = await fetch_value(node, contacts[peer_id], state.key_id)
            else:
                found = None
            entry = stored_entry(found) if found is not None else None
            if entry is None:
                continue
            same = entry_digest(entry) == digest
            state.values += [(entry, contacts[holder]) for holder in (holders if same else [peer_id])]
            if found is not None and found.more:
                state.paged.append(contacts[peer_id])
            break


async def fetch_value(node: DHTNode, contact: Contact, key_id: int) -> FoundValue | None:
    """What `contact` holds for a key, the value alone (its first page, for a dictionary)."""
    request = FindRequest(sender=node._me(), key_ids=[id_to_bytes(key_id)], value_only=True)
    response = await node._call(contact, "Find", request)
    return response.results[0].value if response is not None and response.results else None


async def _until(future: asyncio.Future[FoundValue | None], node: DHTNode, deadline: float | None) -> FoundValue | None:
    """The future's value, or None if it is not there by the deadline."""
    remaining = None if deadline is None else max(0.0, deadline - node.clock.monotonic())
    done, _ = await asyncio.wait({future}, timeout=remaining)
    return future.result() if done else None


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

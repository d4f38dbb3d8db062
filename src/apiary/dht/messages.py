"""Conversions between DHT protobuf messages and the node's own types."""

from __future__ import annotations

import functools
import hashlib
import math
import struct

from apiary.dht.protos.dht_pb2 import FoundValue, NodeInfo, StoreItem, SubkeyValue
from apiary.dht.routing import Contact
from apiary.dht.storage import StoredEntry, ValueWithExpiration
from apiary.dht.validation import DHTRecord
from apiary.wire import AddressError, Endpoint, IdentityError, InvalidRequest
from apiary.wire.identity import public_key_from_peer_id


def contact_of(info: NodeInfo) -> Contact | None:
    """The contact a NodeInfo describes; None for client-mode or malformed senders."""
    return _contact(info.peer_id, info.address) if info.address else None


@functools.lru_cache(maxsize=1 << 14)  # every Find answer names k contacts, mostly ones seen before
def _contact(peer_id: str, address: str) -> Contact | None:
    try:
        public_key_from_peer_id(peer_id)
        return Contact(peer_id, Endpoint.parse(address))
    except (AddressError, IdentityError):
        return None


def node_info(contact: Contact) -> NodeInfo:
    return NodeInfo(peer_id=contact.peer_id, address=str(contact.endpoint))


def found_value(entry: StoredEntry | None, *, after: bytes = b"", page_bytes: int | None = None) -> FoundValue:
    """An entry as a Find answers it. A dictionary comes in pages of about `page_bytes` (at least
    one subkey each), its subkeys in byte order after the cursor `after`; `more` marks a page
    that others follow (not found: nothing after the cursor)."""
    if entry is None:
        return FoundValue(found=False)
    if entry.value is not None:
        return FoundValue(found=True, value=entry.value.value, expiration=entry.value.expiration)
    page, size, more = [], 0, False
    for subkey in sorted(k for k in entry.subkeys if k > after):
        item = entry.subkeys[subkey]
        size += len(subkey) + len(item.value) + 16
        if page_bytes is not None and page and size > page_bytes:
            more = True
            break
        page.append(SubkeyValue(subkey=subkey, value=item.value, expiration=item.expiration))
    if not page:
        return FoundValue(found=False)
    return FoundValue(found=True, expiration=entry.expiration, subkeys=page, more=more)


def entry_digest(entry: StoredEntry) -> bytes:
    """16 bytes that two nodes holding the same records (values, subkeys, expirations) give alike."""
    digest = hashlib.blake2b(digest_size=16)
    items = [(b"", entry.value)] if entry.value is not None else sorted(entry.subkeys.items())
    for subkey, item in items:
        digest.update(struct.pack("!IId", len(subkey), len(item.value), item.expiration))
        digest.update(subkey)
        digest.update(item.value)
    return digest.digest()


def digest_value(entry: StoredEntry | None, stored: bool) -> FoundValue:
    """An entry as a Find that asked for digests answers it: its digest and newest expiration."""
    if entry is None:
        return FoundValue(found=False)
    return FoundValue(found=True, digest=entry_digest(entry), expiration=entry.expiration, stored=stored)


def stored_entry(found: FoundValue) -> StoredEntry | None:
    if not found.found:
        return None
    if found.subkeys:
        return StoredEntry(subkeys={s.subkey: ValueWithExpiration(s.value, s.expiration) for s in found.subkeys})
    return StoredEntry(value=ValueWithExpiration(found.value, found.expiration))


def records_of(key: bytes, entry: StoredEntry) -> list[DHTRecord]:
    """The records an entry holds under `key`: its value, or one per subkey."""
    if entry.value is not None:
        return [DHTRecord(key, None, entry.value.value, entry.value.expiration)]
    return [DHTRecord(key, subkey, item.value, item.expiration) for subkey, item in entry.subkeys.items()]


def check_items(items: list[StoreItem], max_items: int) -> None:
    """Raises InvalidRequest naming the first item that is malformed (a record past a storage
    limit is refused on its own, with the limit named in the reply: `DHTNode._store_local`)."""
    if len(items) > max_items:
        raise InvalidRequest(f"{len(items)} items in one request exceed max_items_per_request={max_items}")
    for index, item in enumerate(items):
        if not math.isfinite(item.expiration):
            raise InvalidRequest(f"item {index}: expiration {item.expiration} is not a finite time")
        if not item.key:
            raise InvalidRequest(f"item {index}: empty key")


def merge_entries(entries: list[StoredEntry]) -> StoredEntry | None:
    """Combines what several nodes returned for one key: newest plain value or merged subkeys."""
    best_value: ValueWithExpiration | None = None
    subkeys: dict[bytes, ValueWithExpiration] = {}
    for entry in entries:
        if entry.value is not None:
            if best_value is None or entry.value.expiration > best_value.expiration:
                best_value = entry.value
        for subkey, item in entry.subkeys.items():
            if subkey not in subkeys or item.expiration > subkeys[subkey].expiration:
                subkeys[subkey] = item
    dictionary = StoredEntry(subkeys=subkeys) if subkeys else None
    if best_value is not None and (dictionary is None or best_value.expiration > dictionary.expiration):
        return StoredEntry(value=best_value)
    return dictionary

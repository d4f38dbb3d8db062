"""Relay discovery: relays list themselves in the DHT, peers behind NAT read the list.

A service that offers relaying (`WireSettings.relay`) and can be dialled keeps a record under
`RELAYS_KEY`, one subkey per relay (its peer id), value `{"address": "peer@host:port",
"circuits": <circuits open>, "limit": <bytes/s per circuit, 0: none>}`, re-stored every period
and living three, so a relay that stops disappears from the list on its own. `listed_relays` is
where `Reservations` finds candidates: the relays listed, least busy first, each with its rate
limit (a relayed averager declares no more bandwidth than its primary relay's circuits carry).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from apiary.dht.interface import DHTLike
from apiary.wire import AddressError, PeerAddress, RpcServer

RELAYS_KEY = "_apiary.relays"


@dataclass(frozen=True)
class ListedRelay:
    """A relay as listed in the DHT."""

    address: PeerAddress
    circuits: int  # circuits open when it listed itself
    limit: float  # bytes per second one circuit may carry (0: no limit)


def relay_record(server: RpcServer) -> dict[str, Any] | None:
    """The record `server` lists itself with (None: it offers no relay)."""
    address = server.relay_address
    if address is None or server.relay is None:
        return None
    return {"address": str(address), "circuits": server.relay.circuits,
            "limit": server.settings.relay_circuit_bytes_per_second}


async def list_relay(dht: DHTLike, server: RpcServer, ttl: float) -> bool:
    """Stores `server`'s relay record for `ttl` seconds; whether the DHT took it."""
    record = relay_record(server)
    if record is None:
        return False
    return await dht.store(RELAYS_KEY, record, time.time() + ttl, subkey=server.identity.peer_id)


async def listed_relays(dht: DHTLike) -> list[ListedRelay]:
    """The relays listed in the DHT, fewest circuits open first (malformed entries skipped)."""
    found = await dht.get(RELAYS_KEY, latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    listed: list[ListedRelay] = []
    for peer_id, item in found.value.items():
        value = getattr(item, "value", None)
        if not isinstance(value, dict) or not isinstance(value.get("address"), str):
            continue
        try:
            address = PeerAddress.parse(value["address"])
        except AddressError:
            continue
        circuits, limit = value.get("circuits"), value.get("limit")
        if address.peer_id == peer_id and not address.endpoint.relayed:
            listed.append(ListedRelay(address, circuits if isinstance(circuits, int) else 0,
                                      float(limit) if isinstance(limit, (int, float)) and limit > 0 else 0.0))
    return sorted(listed, key=lambda relay: relay.circuits)

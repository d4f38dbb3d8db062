"""The routing table's nearest nodes (the DHT's every lookup and every Find answer) are the
nearest by XOR distance among all it knows, whatever the buckets' splits."""

from __future__ import annotations

import random

from apiary.dht.ids import MAX_ID
from apiary.dht.routing import Contact, RoutingTable
from apiary.wire import Endpoint

from tests.sim.swarm import identities


def test_nearest_is_the_nearest_of_all_known_contacts() -> None:
    rng = random.Random(3)
    ids = identities(7, 600)
    table = RoutingTable(Contact(ids[0].peer_id, Endpoint("10.0.0.1", 1)).id, bucket_size=8)
    for index, identity in enumerate(ids[1:]):
        table.add(Contact(identity.peer_id, Endpoint(f"10.0.{index >> 8}.{index & 255}", 2)))
    known = table.contacts()
    assert len(table.buckets) > 10 and len(known) > 80  # split deep enough to order many buckets
    for target in [rng.randrange(MAX_ID) for _ in range(200)] + [table.own_id, known[5].id]:
        excluded = rng.choice(known).peer_id
        for count in (1, 8, 20, 500):
            expected = sorted((c for c in known if c.peer_id != excluded), key=lambda c: c.id ^ target)[:count]
            assert table.nearest(target, count, exclude=excluded) == expected

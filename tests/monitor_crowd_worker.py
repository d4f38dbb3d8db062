"""Publishes the records of a crowd of peers through real DHT nodes, for the monitor's 200-peer test.

    python monitor_crowd_worker.py <initial peer> <peers> <run>

Each of `peers` identities is a client-mode DHT node of its own (they share one channel pool),
so each record is signed by its own peer, as a service's is. Every peer publishes a peer
record; the trainers among them also publish progress in `run`, and the averagers rounds.
Prints `published <n>` once the DHT took them all, then keeps them alive until killed.
"""

from __future__ import annotations

import asyncio
import sys
import time

from apiary.dht import DHTNode, DHTSettings
from apiary.optim.progress import ProgressTracker
from apiary.services.records import PEERS_KEY, PeerRecord, RoundSummary, record_subkey, rounds_key
from apiary.wire import ChannelPool, Identity, PeerAddress, WireSettings

KINDS = ("trainer", "averager", "dht", "expert-server")
TTL = 600.0


async def publish(node: DHTNode, index: int, run: str) -> bool:
    peer_id, kind, now = node.identity.peer_id, KINDS[index % len(KINDS)], time.time()
    record = PeerRecord(peer_id=peer_id, kind=kind, version="0.1.0", addresses=[f"{peer_id}@10.0.{index // 250}.{index % 250}:7000"],
                        reachability=("public", "behind_nat", "unknown")[index % 3], started_at=now - 60 * index,
                        device="cpu (x86_64, 8 cores)", load=round(index % 7 / 3, 2),
                        run=run if kind in ("trainer", "averager") else None, published_at=now,
                        info={"loss": 2.0 - index / 200} if kind == "trainer" else {})
    items = [(PEERS_KEY, record_subkey(peer_id, peer_id), record.as_value(), now + TTL)]
    if kind == "averager":
        summary = RoundSummary(now - 5, "ok", 4, 1.5, 1 << 20)
        items.append((rounds_key(run), record_subkey(peer_id, peer_id), [summary.__dict__], now + TTL))
    stored = await node.store_many(items)
    if kind == "trainer":
        tracker = ProgressTracker(node, run, peer_id, ttl=TTL)
        stored.append(await tracker.publish(3, 100 + index, 10.0 + index % 5))
    return all(stored)


async def main(initial: str, count: int, run: str) -> None:
    wire = WireSettings(listen_host="127.0.0.1", tls=False, bulk=False)
    pool = ChannelPool(wire)
    nodes = []
    for _ in range(count):
        node = DHTNode(Identity.generate(), DHTSettings(client_mode=True), pool=pool)
        await node.join([PeerAddress.parse(initial)])
        nodes.append(node)
    results = await asyncio.gather(*(publish(node, index, run) for index, node in enumerate(nodes)))
    print(f"published {sum(results)}", flush=True)
    await asyncio.sleep(TTL)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))

"""How a task's remote experts are found: the participant's dht service or a client-mode DHT node.

A task reaches the experts through the participant's dht service (`dht_local`, host:port of its
local API, as the trainer's APIARY_DHT_LOCAL) or a client-mode DHT node joining
`initial_peers`. It dials them with the trainer's wire settings from its environment:
APIARY_TLS, and in a private run APIARY_RUN_AUTHORITY, APIARY_ACCESS_TOKEN and
APIARY_IDENTITY (the trainer's own key, which its token admits).
"""

from __future__ import annotations

import os
from pathlib import Path

from apiary.dht import DHTNode, DHTSettings
from apiary.dht.api import DHTClient
from apiary.moe.client import run_sync
from apiary.wire import ChannelPool, Endpoint, Identity, WireSettings, parse_peer_list


def wire_from_environment() -> tuple[WireSettings, Identity | None]:
    """The trainer's TLS and private-run settings, as its APIARY_* variables give them."""
    authority = os.environ.get("APIARY_RUN_AUTHORITY") or None
    settings = WireSettings(tls=os.environ.get("APIARY_TLS", "true").lower() not in ("false", "0", "no"),
                            run_authority=authority,
                            access_token=(os.environ.get("APIARY_ACCESS_TOKEN") or None) if authority else None)
    identity_file = os.environ.get("APIARY_IDENTITY")
    identity = Identity.load(Path(identity_file)) if authority and identity_file else None
    return settings, identity


def experts_dht(task: str, initial_peers: str, dht_local: str) -> DHTClient | DHTNode:
    """The DHT where `task`'s experts are declared: `dht_local` (default: APIARY_DHT_LOCAL unless
    `initial_peers` is given) or a client-mode node joining `initial_peers`, exactly one of them."""
    dht_local = dht_local or ("" if initial_peers else os.environ.get("APIARY_DHT_LOCAL", ""))
    if bool(dht_local) == bool(initial_peers):
        raise ValueError(f"the {task} task needs exactly one of dht_local (the participant's dht service, "
                         "host:port) and initial_peers (a DHT node of the swarm of its expert servers)")
    if dht_local:
        settings, identity = wire_from_environment()
        return DHTClient(Endpoint.parse(dht_local), ChannelPool(settings, identity=identity))
    return run_sync(DHTNode.launch(parse_peer_list(initial_peers), settings=DHTSettings(client_mode=True)), 30)

"""Settings of a DHT node."""

from __future__ import annotations

from pydantic import BaseModel, Field


class DHTSettings(BaseModel):
    bucket_size: int = Field(20, ge=2, description="nodes per k-bucket (Kademlia's k)")
    num_replicas: int = Field(5, ge=1, description="nodes that store each value")
    parallelism: int = Field(3, ge=1, description="concurrent queries per key in a lookup (Kademlia's alpha)")
    read_quorum: int = Field(3, ge=1, description="a latest read ends once this many nodes gave the same newest value, one of them storing it (not a cached copy)")
    rpc_timeout: float = Field(3.0, gt=0, description="deadline of one DHT RPC, seconds")
    bootstrap_timeout: float = Field(15.0, gt=0, description="seconds to reach an initial peer before giving up")
    refresh_period: float = Field(300.0, gt=0, description="refresh k-buckets not updated for this many seconds")
    reping_period: float = Field(15.0, gt=0, description="seconds between pings of nodes removed as unreachable (those that answer are added back)")
    reping_for: float = Field(3600.0, ge=0, description="seconds after its removal that an unreachable node is still pinged")
    max_value_bytes: int = Field(64 << 10, ge=64, description="largest value (one record, signature included) accepted for storage")
    max_subkeys: int = Field(4096, ge=1, description="most subkeys one dictionary key holds: a new subkey past it is refused")
    max_items_per_request: int = Field(1024, ge=1, description="largest number of keys or items in one RPC")
    client_mode: bool = Field(False, description="do not accept connections (behind NAT): get and store only")
    cache_on_lookup: bool = Field(True, description="cache found values on the nearest node of the lookup that lacked them")
    cache_ttl: float = Field(30.0, gt=0, description="seconds a copy cached next to the key's nearest nodes lives; halved per node further out")
    replica_cache_ttl: float = Field(30.0, ge=0, description="seconds a writer stores straight on the nodes its last lookup found nearest a key (0: a lookup before every store)")
    max_cached_keys: int = Field(4096, ge=1, description="most keys a node keeps cached copies of (the soonest to expire go first)")
    hot_key_factor: float = Field(10.0, gt=1, description="a key asked for this many times more than the average key is hot (reported)")
    hot_key_half_life: float = Field(60.0, gt=0, description="seconds over which a key's request count halves")
    page_bytes: int = Field(256 << 10, ge=1024, description="a Find answers a dictionary in pages of about this many bytes")
    max_get_bytes: int = Field(32 << 20, ge=1024, description="a get follows a dictionary's pages up to this many bytes in all")

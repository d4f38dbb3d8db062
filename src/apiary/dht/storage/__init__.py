"""Where a DHT node keeps its records: in memory, or in Redis so they survive a restart."""

from apiary.dht.storage.base import Storage, StorageUnavailable, StoredEntry, ValueWithExpiration
from apiary.dht.storage.memory import MemoryStorage
from apiary.dht.storage.redis import RedisStorage

__all__ = [
    "MemoryStorage",
    "RedisStorage",
    "Storage",
    "StorageUnavailable",
    "StoredEntry",
    "ValueWithExpiration",
]

"""The DHT: a Kademlia node, its storage in memory or Redis, record validators. No torch."""

from apiary.dht.node import DHTBootstrapError, DHTNode, Found
from apiary.dht.settings import DHTSettings

__all__ = ["DHTBootstrapError", "DHTNode", "DHTSettings", "Found"]

"""Decentralized averaging: matchmaking through the DHT, butterfly all-reduce, compression, state transfer."""

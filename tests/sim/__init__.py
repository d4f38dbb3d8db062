"""A simulator for the real DHT and progress code: a virtual-time event loop (`loop`), a network
of hosts with drawn latencies and uplinks that carries the services' calls and counts their
bytes (`network`), and swarms of real `DHTNode`s on it (`swarm`). The code under test is the
production code, given the simulated transport and clock (`DHTNode(transport=, clock=)`,
`ProgressTracker(clock=)`); nothing in `src/` imports this package."""

"""The simulator's byte accounting holds on real sockets: benchmarks/scale_sockets.py's scenario
(progress written, aggregated and read by every peer) run by 48 real DHT nodes over two worker
processes (signed records, over TLS) and by the same identities in the simulator."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from scale_sockets import compare  # noqa: E402


def test_real_nodes_serve_what_the_simulator_says_they_serve_and_count_the_same_swarm():
    result = compare(48, 2, seed=3, tls=True)
    real, sim = result["sockets"], result["simulator"]
    for side in (real, sim):
        assert side["stored"] == 48 and side["shards"] == 2 and side["aggregators"] >= 3
        assert side["counted_peers"] == [48, 48, 48]  # every reader counts the swarm exactly
        assert side["served_per_peer_by_method"]["Find"] > side["served_per_peer_by_method"]["Store"] > 0
    ratios = result["sockets_over_simulator"]
    assert 0.8 < ratios["served_per_peer"] < 1.25, result
    assert 0.67 < ratios["served_busiest"] < 1.5, result

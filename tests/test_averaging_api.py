"""The averager's local API package and the `Averager` API it drives: what the trainer's client
loads, the shared-memory segment's ownership, and the averager's traffic and round hooks."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import torch

from apiary.averaging.averager import Averager, AveragerSettings, RoundResult
from apiary.dht import DHTNode
from apiary.wire import Identity, PeerAddress, RpcServer, WireSettings

LOADED_BY_CLIENT = """
import json, sys
import apiary.averaging.api.client
print(json.dumps(sorted(name for name in sys.modules if name.startswith(("apiary.", "scipy")))))
"""


def test_the_trainers_client_loads_neither_the_servicer_nor_the_averager_nor_scipy():
    result = subprocess.run([sys.executable, "-c", LOADED_BY_CLIENT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    unwanted = [name for name in loaded
                if name in ("scipy", "apiary.averaging.api.servicer", "apiary.averaging.averager", "apiary.services")]
    assert not unwanted, f"apiary.averaging.api.client loads {unwanted}"


MAP_IN_A_CHILD = """
import sys
from apiary.averaging.api.shared_memory import map_segment, release_segment
segment = map_segment(sys.argv[1])
segment.buf[0] = 7
release_segment(segment)
"""

CREATE_AND_MAP_IN_ONE_PROCESS = """
from apiary.averaging.api.shared_memory import create_segment, map_segment, release_segment
created = create_segment(4)
mapped = map_segment(created.name)
mapped.buf[0] = 9
assert created.buf[0] == 9
release_segment(mapped)
release_segment(created, unlink=True)
print(created.name)
"""


def test_a_segment_mapped_by_another_process_outlives_it_and_its_creator_unlinks_it():
    from apiary.averaging.api.shared_memory import create_segment, release_segment

    segment = create_segment(16)
    try:
        child = subprocess.run([sys.executable, "-c", MAP_IN_A_CHILD, segment.name], capture_output=True, text=True,
                               timeout=60)
        assert child.returncode == 0, child.stderr
        assert "leaked" not in child.stderr and "Traceback" not in child.stderr, child.stderr
        assert Path("/dev/shm", segment.name).exists()  # the mapping process did not unlink it at exit
        assert segment.buf[0] == 7
    finally:
        release_segment(segment, unlink=True)
    assert not Path("/dev/shm", segment.name).exists()


def test_one_process_that_creates_and_maps_a_segment_releases_it_cleanly():
    """Trainer and averager in one process share the resource tracker: mapping must not drop
    the creator's registration (the tracker would complain when the creator unlinks)."""
    result = subprocess.run([sys.executable, "-c", CREATE_AND_MAP_IN_ONE_PROCESS], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "leaked" not in result.stderr, result.stderr
    assert not Path("/dev/shm", result.stdout.strip()).exists()


async def test_the_averagers_hooks_report_every_byte_and_round():
    """Three averagers, one round: what each hook reports adds up, and the bytes sent across
    the group are the bytes received."""
    first = await DHTNode.launch()
    sent: list[list[int]] = [[], [], []]
    received: list[list[int]] = [[], [], []]
    rounds: list[list[RoundResult]] = [[], [], []]
    peers = []
    try:
        for index in range(3):
            dht = await DHTNode.launch([PeerAddress.parse(first.address)])
            identity = Identity.generate()
            server = RpcServer(WireSettings(listen_host="127.0.0.1", shutdown_grace=0.2), identity)
            averager = Averager([torch.full((40, 5), float(index))], dht, identity.peer_id,
                                AveragerSettings(prefix="hooks", target_group_size=3, expected_peers=3,
                                                 gather_seconds=1.0, join_seconds=1.0),
                                on_bytes_sent=sent[index].append, on_bytes_received=received[index].append,
                                on_round=rounds[index].append)
            averager.attach(server)
            await server.start()
            peers.append((dht, server, averager))
        sizes = await asyncio.wait_for(asyncio.gather(*(a.step(1.0) for _, _, a in peers)), 30)
        assert sizes == [3, 3, 3]
        for index, (_, _, averager) in enumerate(peers):
            torch.testing.assert_close(averager.tensors[0], torch.full((40, 5), 1.0))
            [result] = rounds[index]
            assert result == averager.last_round
            assert (result.result, result.group_size) == ("ok", 3)
            assert result.sent_bytes == sum(sent[index]) > 0
            assert result.received_bytes == sum(received[index]) > 0
        # each span's part reaches its reducer from the two other peers, and its mean goes back to both
        assert sum(map(sum, sent)) == sum(map(sum, received)) == 2 * 800 + 2 * 800

        await peers[0][2].step(1.0)  # alone now: no group, and nothing sent
        assert (rounds[0][-1].result, rounds[0][-1].sent_bytes, rounds[0][-1].received_bytes) == ("no_group", 0, 0)
    finally:
        for dht, server, averager in peers:
            await averager.close()
            await server.stop(0)
            await dht.shutdown()
        await first.shutdown()

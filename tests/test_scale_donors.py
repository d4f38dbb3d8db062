"""Many newcomers against a few state donors, and the expert search over a popular grid: the
load spreads and stays bounded. Donors, newcomers and the DHT are real nodes over real gRPC and
bulk connections in this process."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import torch

from apiary.averaging.state import STATE_ROUTE, State, StateDonor, download_state
from apiary.dht import DHTNode, DHTSettings
from apiary.moe.beam_search import beam_search
from apiary.moe.declaration import declare_experts
from apiary.services.averager import AveragerServiceSettings
from apiary.wire import Identity, PeerAddress, RpcServer, WireSettings
from apiary.wire.bulk import BulkAnswer, BulkCall, BulkClient

TENSORS = [torch.arange(20_000, dtype=torch.float32), torch.ones(7, dtype=torch.int64)]


class HeldDonor(StateDonor):
    """A donor whose answers leave only once `release` is set: a download in progress, held."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = asyncio.Event()

    async def handle(self, call: BulkCall) -> BulkAnswer:
        answer = await super().handle(call)
        await self.release.wait()
        return answer


@asynccontextmanager
async def donors(specs: Sequence[tuple[type[StateDonor], int]]) -> AsyncIterator[tuple[list[StateDonor], str]]:
    """Donors of epoch 5 (class, max_downloads), each with its DHT node; yields them and the
    address to join their DHT through."""
    nodes: list[DHTNode] = []
    servers: list[RpcServer] = []
    made: list[StateDonor] = []
    try:
        for cls, max_downloads in specs:
            node = await DHTNode.launch([PeerAddress.parse(nodes[0].address)] if nodes else [])
            nodes.append(node)
            identity = Identity.generate()
            server = RpcServer(WireSettings(listen_host="127.0.0.1"), identity)
            servers.append(server)
            donor = cls("run", identity.peer_id, max_downloads=max_downloads)
            server.bulk.add_route(STATE_ROUTE, donor.handle)
            await server.start()
            donor.bulk_address = str(server.announced_bulk)
            donor.update(State({"epoch": 5}, TENSORS))
            assert await donor.announce(node, ttl=300)
            made.append(donor)
        yield made, nodes[0].address
    finally:
        for donor in made:
            if isinstance(donor, HeldDonor):
                donor.release.set()
        await asyncio.gather(*(server.stop(0) for server in servers))
        await asyncio.gather(*(node.shutdown() for node in nodes))


async def newcomer(entry: str, seed: int, *, exclude: Sequence[str] = (), timeout: float = 20) -> State:
    """A newcomer of its own (client-mode DHT node, bulk client) downloading the state."""
    node = await DHTNode.launch([PeerAddress.parse(entry)], settings=DHTSettings(client_mode=True))
    client = BulkClient()
    try:
        return await download_state(node, "run", client, timeout=timeout, exclude=exclude, rng=random.Random(seed))
    finally:
        await client.close()
        await node.shutdown()


async def test_twenty_newcomers_spread_over_four_donors() -> None:
    async with donors([(StateDonor, 20)] * 4) as (made, entry):
        states = await asyncio.gather(*(newcomer(entry, seed) for seed in range(20)))
        assert all(state.epoch == 5 and torch.equal(state.tensors[0], TENSORS[0]) for state in states)
        served = [donor.downloads for donor in made]
        assert sum(served) == 20
        assert max(served) <= 10, f"downloads per donor {served}: one served more than twice its share of 5"


NEWCOMERS = 24


async def test_a_busy_donor_refuses_and_the_newcomer_moves_on(caplog: pytest.LogCaptureFixture) -> None:
    """The busy donor announced its capacity before it filled (the newcomers read a stale
    `free`); the other donor serves 3 at a time, so some newcomers also wait for a free slot."""
    async with donors([(HeldDonor, 1), (StateDonor, 3)]) as (made, entry):
        busy, other = made
        held = asyncio.ensure_future(newcomer(entry, 0, exclude=[other.peer_id]))
        while busy._serving < 1:  # the held download has begun
            await asyncio.sleep(0.05)
        with caplog.at_level(logging.INFO, logger="apiary.averaging.state"):
            started = time.monotonic()
            # each newcomer asks the busy donor first with odds 1/4 (its stale `free` is 1 of 4): 24 of
            # them leave every one asking the other first once in (3/4) ** 24, about 1e-3
            states = await asyncio.gather(*(newcomer(entry, seed, timeout=10) for seed in range(1, NEWCOMERS + 1)))
        assert all(state.epoch == 5 for state in states)
        assert time.monotonic() - started < 8, "newcomers waited for the busy donor"
        refusals = [r for r in caplog.records if f"{busy.peer_id[:8]} is busy" in r.getMessage()]
        assert refusals, "no newcomer asked the busy donor (seeds)"
        assert other.downloads == NEWCOMERS and busy.downloads == 0
        busy.release.set()
        assert (await held).epoch == 5
        assert busy.downloads == 1


class CountingDHT:
    """A real DHT node, with the keys each `get_many` reads recorded (the search's lookups)."""

    def __init__(self, node: DHTNode):
        self.node = node
        self.reads: list[int] = []

    async def get_many(self, keys: list[Any], latest: bool = False, *, timeout: float | None = None) -> list[Any]:
        self.reads.append(len(keys))
        return await self.node.get_many(keys, latest=latest, timeout=timeout)


async def test_beam_search_reads_at_most_max_lookups_keys_per_level_of_a_popular_grid() -> None:
    grid = (12, 12, 4)
    names = [f"ffn.{i}.{j}.{k}" for i in range(grid[0]) for j in range(grid[1]) for k in range(grid[2])]
    first = await DHTNode.launch()
    second = await DHTNode.launch([PeerAddress.parse(first.address)])
    try:
        assert all(await declare_experts(first, names, "127.0.0.1:1", ttl=300))
        dht = CountingDHT(second)
        generator = torch.Generator().manual_seed(0)
        scores = [torch.randn(64, size, generator=generator) for size in grid]  # 64 samples, all over the grid
        chosen = await beam_search(dht, "ffn", scores, k_best=2, beam_size=4)
        assert dht.reads == [1, 4, 4], f"keys read per level: {dht.reads}"
        assert all(len(experts) == 2 and experts[0].name in names for experts in chosen)

        dht.reads.clear()  # a larger bound: more of each sample's beam is looked up
        await beam_search(dht, "ffn", scores, k_best=2, beam_size=4, max_lookups=10)
        assert dht.reads == [1, 10, 10]

        one = [s[:1] for s in scores]  # one sample: its whole beam fits the bound, as before
        best = max(((a, b, c) for a in range(12) for b in range(12) for c in range(4)),
                   key=lambda x: sum(one[d][0, x[d]].item() for d in range(3)))
        [experts] = await beam_search(dht, "ffn", one, k_best=1, beam_size=12)
        assert experts[0].coordinates == best
    finally:
        await second.shutdown()
        await first.shutdown()


def test_max_downloads_is_a_flag_and_an_environment_variable_of_the_averager() -> None:
    command = [sys.executable, "-m", "apiary", "averager"]
    shown = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "COLUMNS": "200"})
    assert "--max-downloads" in shown.stdout and "APIARY_MAX_DOWNLOADS" in shown.stdout, shown.stdout
    refused = subprocess.run([*command, "--max-downloads", "0"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--max-downloads" in refused.stderr, refused.stderr
    with pytest.raises(ValueError, match="max_downloads"):
        AveragerServiceSettings(initial_peers=["127.0.0.1:1"], max_downloads=0)

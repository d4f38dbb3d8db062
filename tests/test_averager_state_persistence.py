"""An averager keeps the latest state across its own restart when given a state path."""

from __future__ import annotations

import torch

from apiary.averaging.averager import AveragerSettings
from apiary.averaging.api.client import AveragerClient
from apiary.averaging.state import State, download_state, load_saved_state, save_state
from apiary.dht import DHTNode
from apiary.services.averager import AveragerService, AveragerServiceSettings
from apiary.services.host import ServiceSettings
from apiary.wire import PeerAddress, WireSettings
from apiary.wire.bulk import BulkClient


def tensors() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(64, 33, generator=generator), torch.randn(7, generator=generator).to(torch.bfloat16),
            torch.tensor(2.5, dtype=torch.float64)]


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
        for x, y in zip(a, b)
    )


def test_a_saved_state_loads_back_bit_exactly(tmp_path) -> None:
    path = tmp_path / "nested" / "state.pt"
    assert load_saved_state(path) is None
    save_state(State({"epoch": 4, "note": "x"}, tensors()), path)
    loaded = load_saved_state(path)
    assert loaded.metadata == {"epoch": 4, "note": "x"} and same_bits(loaded.tensors, tensors())
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]  # no temporary file left


async def test_a_restarted_averager_serves_the_state_it_held(tmp_path) -> None:
    first = await DHTNode.launch()

    def service() -> AveragerService:
        return AveragerService(
            WireSettings(listen_host="127.0.0.1"), ServiceSettings(), AveragerSettings(prefix="run"),
            AveragerServiceSettings(initial_peers=[PeerAddress.parse(first.address)], state_path=tmp_path / "state.pt"),
        )

    averager = service()
    await averager.start()
    client = AveragerClient(averager.local_endpoint)
    try:
        await client.publish_state({"epoch": 9}, tensors())
    finally:
        await client.close()
        await averager.host.shutdown()

    restarted = service()
    await restarted.start()
    bulk = BulkClient()
    try:
        state = await download_state(first, "run", bulk, timeout=20)
        assert state.epoch == 9 and same_bits(state.tensors, tensors())
    finally:
        await bulk.close()
        await restarted.host.shutdown()
        await first.shutdown()

"""The DHT keys a remote mixture's expert search reads per grid level: at most `max_lookups`,
set on the layer or through a task's options, however many samples and prefixes. The DHT is
real nodes in this process with a popular grid declared."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
import torch
from service_processes import APIARY
from test_scale_donors import CountingDHT

from apiary.dht import DHTNode
from apiary.moe import FaultTolerance, RemoteMixtureOfExperts, RemoteSwitchMixtureOfExperts
from apiary.moe.bans import ServerBans
from apiary.moe.client import run_sync
from apiary.moe.declaration import declare_experts
from apiary.tasks import TaskError, load_task
from apiary.tasks.moe_lm import PRESETS, TokenRouting, build_model, moe_layers
from apiary.wire import PeerAddress

GRID = (8, 8, 2)
HIDDEN = 16


@pytest.fixture(scope="module")
def nodes() -> Iterator[tuple[DHTNode, DHTNode]]:
    """Two DHT nodes on the layers' loop; the first declares every expert of `ffn` and of
    digits_moe's grid (at an address that refuses calls: only the search is watched)."""
    first = run_sync(DHTNode.launch(), 30)
    second = run_sync(DHTNode.launch([PeerAddress.parse(first.address)]), 30)
    names = [f"ffn.{i}.{j}.{k}" for i in range(GRID[0]) for j in range(GRID[1]) for k in range(GRID[2])]
    names += [f"digits.{i}.{j}" for i in range(3) for j in range(4)]  # digits_moe's grid
    assert all(run_sync(declare_experts(first, names, "127.0.0.1:1", ttl=300), 60))
    try:
        yield first, second
    finally:
        run_sync(second.shutdown(), 30)
        run_sync(first.shutdown(), 30)


def _layer(switch: bool, dht: CountingDHT, **search: int) -> RemoteMixtureOfExperts:
    tolerance = FaultTolerance(forward_timeout=5, allow_zero_outputs=True)
    if switch:
        return RemoteSwitchMixtureOfExperts(in_features=HIDDEN, grid_size=GRID, dht=dht, prefix="ffn",  # type: ignore[arg-type]
                                            fault_tolerance=tolerance, bans=ServerBans(), **search)
    return RemoteMixtureOfExperts(in_features=HIDDEN, grid_size=GRID, dht=dht, prefix="ffn", k_best=2,  # type: ignore[arg-type]
                                  fault_tolerance=tolerance, bans=ServerBans(), **search)


@pytest.mark.parametrize("switch", [False, True], ids=["mixture", "switch"])
def test_a_layer_reads_at_most_max_lookups_keys_per_level(nodes: tuple[DHTNode, DHTNode], switch: bool) -> None:
    dht = CountingDHT(nodes[1])
    x = torch.randn(48, HIDDEN, generator=torch.Generator().manual_seed(0))  # 48 samples' beams over the grid
    default = _layer(switch, dht, beam_size=5)
    default(x)
    assert dht.reads == [1, 5, 5], f"keys read per level: {dht.reads}"  # beam_size's worth by default
    dht.reads.clear()
    bounded = _layer(switch, dht, beam_size=5, max_lookups=2)
    assert bounded.max_lookups == 2
    chosen = bounded.find_experts(bounded.grid_scores(x), bounded.k_best)
    assert all(len(experts) == bounded.k_best for experts in chosen)  # every sample still finds its experts
    assert dht.reads == [1, 2, 2], f"keys read per level: {dht.reads}"
    dht.reads.clear()
    bounded(x)  # and the layer's forward pass searches the same way
    assert dht.reads == [1, 2, 2], f"keys read per level: {dht.reads}"


@pytest.mark.parametrize("search, named", [({"max_lookups": 0}, "max_lookups"), ({"max_lookups": 2.5}, "max_lookups"),
                                           ({"max_lookups": True}, "max_lookups"), ({"beam_size": 1}, "beam_size")])
def test_bad_search_bounds_are_refused_by_name(nodes: tuple[DHTNode, DHTNode], search: dict[str, object],
                                                named: str) -> None:
    with pytest.raises(ValueError, match=f"^{named} must be None \\(the default\\) or an integer of at least"):
        _layer(False, CountingDHT(nodes[1]), **search)  # type: ignore[arg-type]


def test_tasks_take_the_search_bounds_as_options(nodes: tuple[DHTNode, DHTNode]) -> None:
    digits = load_task("digits_moe", initial_peers=nodes[0].address, beam_size=5, max_lookups=2)
    moe = digits.model.moe
    node = moe.dht  # the task's own client-mode node
    try:
        assert (moe.beam_size, moe.max_lookups) == (5, 2)
        moe.dht = dht = CountingDHT(node)
        moe.find_experts(moe.grid_scores(torch.randn(64, 32)), moe.k_best)
        assert dht.reads == [1, 2], f"keys read per level: {dht.reads}"  # digits' grid has two levels, 3 prefixes in the second
    finally:
        run_sync(node.shutdown(), 30)

    model = build_model("tiny", "remote", dht=nodes[1], beam_size=3, max_lookups=1)
    layers = [block.ffn for block in model.blocks if isinstance(block.ffn, TokenRouting)]
    assert len(layers) == len(moe_layers(PRESETS["tiny"]))
    assert all((layer.mixture.beam_size, layer.mixture.max_lookups) == (3, 1) for layer in layers)
    for options in ({"max_lookups": 0}, {"experts": "local", "beam_size": 1}):
        with pytest.raises(TaskError, match="max_lookups|beam_size"):
            load_task("moe_lm", **options)


def test_a_bad_bound_stops_the_trainer_with_one_line_naming_it() -> None:
    result = subprocess.run([*APIARY, "trainer", "--run-id", "bad", "--new-swarm", "--task", "digits_moe",
                             "--task-options", '{"initial_peers": "127.0.0.1:1", "max_lookups": 0}'],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apiary: error:"), result.stderr
    assert "max_lookups must be None (the default) or an integer of at least 1, got 0" in lines[0], result.stderr

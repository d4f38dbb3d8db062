"""A newcomer downloads the swarm's state from donors running in their own processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from state_donor_worker import seeded_tensors

from apiary.averaging.compression.selection import codec_selection
from apiary.averaging.state import StateTransferError, download_state
from apiary.dht import DHTNode
from apiary.wire import PeerAddress
from apiary.wire.bulk import BulkClient


class Donors:
    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[str]] = []
        self.first = ""

    def start(self, seed: int, epoch: int, corrupt: bool = False, codec: str = "none") -> dict[str, str]:
        args = [sys.executable, "-m", "tests.state_donor_worker", "--seed", str(seed), "--epoch", str(epoch),
                "--codec", codec]
        if self.first:
            args += ["--initial-peer", self.first]
        if corrupt:
            args.append("--corrupt")
        process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        self.processes.append(process)
        info = json.loads(process.stdout.readline())
        self.first = self.first or info["dht"]
        return info

    def close(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def donors():
    swarm = Donors()
    yield swarm
    swarm.close()


def assert_bit_exact(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


async def test_a_newcomer_gets_the_newest_donors_state_bit_exactly(donors) -> None:
    donors.start(seed=1, epoch=3)
    donors.start(seed=2, epoch=7)
    newcomer = await DHTNode.launch([PeerAddress.parse(donors.first)])
    client = BulkClient()
    try:
        state = await download_state(newcomer, "run", client, timeout=30)
        assert state.epoch == 7 and state.metadata["note"] == "hello"
        assert_bit_exact(state.tensors, seeded_tensors(2))
    finally:
        await client.close()
        await newcomer.shutdown()


@pytest.mark.parametrize("codec", ["uniform8", "adaptive"])
async def test_a_compressed_state_arrives_within_its_codecs_bound(donors, codec) -> None:
    """The donor sends its floating tensors encoded (adaptive: the 21,000-value one as
    float16, being under 65,536 values); integers arrive exactly, dtypes and shapes restored."""
    donors.start(seed=3, epoch=5, codec=codec)
    newcomer = await DHTNode.launch([PeerAddress.parse(donors.first)])
    client = BulkClient()
    try:
        state = await download_state(newcomer, "run", client, timeout=30)
    finally:
        await client.close()
        await newcomer.shutdown()
    assert state.epoch == 5
    expected = seeded_tensors(3)
    used = codec_selection(codec)
    for got, want in zip(state.tensors, expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        if not want.is_floating_point():
            assert torch.equal(got, want)
            continue
        chosen = used.choose(want.numel())
        bound = chosen.error_bound(want.reshape(-1)) + (2.0**-8 * want.abs().max().item()
                                                        if want.dtype == torch.bfloat16 else 0.0)
        error = (got.double() - want.double()).abs().max().item()
        assert error <= bound
    assert (state.tensors[0] - expected[0]).abs().max().item() > 0  # compressed: not bit-exact


async def test_a_corrupted_compressed_transfer_fails_its_checksum_after_decoding(donors) -> None:
    donors.start(seed=2, epoch=9, corrupt=True, codec="quantile8")
    newcomer = await DHTNode.launch([PeerAddress.parse(donors.first)])
    client = BulkClient()
    try:
        with pytest.raises(StateTransferError, match="checksum"):
            await download_state(newcomer, "run", client, timeout=5)
    finally:
        await client.close()
        await newcomer.shutdown()


async def test_a_corrupted_transfer_is_detected_and_retried_from_another_donor(donors) -> None:
    donors.start(seed=1, epoch=4)
    donors.start(seed=2, epoch=9, corrupt=True)  # the newest donor sends corrupted bytes
    newcomer = await DHTNode.launch([PeerAddress.parse(donors.first)])
    client = BulkClient()
    try:
        state = await download_state(newcomer, "run", client, timeout=30)
        assert state.epoch == 4
        assert_bit_exact(state.tensors, seeded_tensors(1))
    finally:
        await client.close()
        await newcomer.shutdown()


async def test_with_no_usable_donor_the_download_gives_up_in_bounded_time_with_a_clear_error(donors) -> None:
    donors.start(seed=2, epoch=9, corrupt=True)
    newcomer = await DHTNode.launch([PeerAddress.parse(donors.first)])
    client = BulkClient()
    started = time.monotonic()
    try:
        with pytest.raises(StateTransferError, match="checksum"):
            await download_state(newcomer, "run", client, timeout=5)
        with pytest.raises(StateTransferError, match="no donor is announced"):
            await download_state(newcomer, "another-run", client, timeout=5)
    finally:
        await client.close()
        await newcomer.shutdown()
    assert time.monotonic() - started < 15

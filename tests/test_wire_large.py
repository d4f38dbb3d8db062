"""A 1 GiB tensor sent to another process bit-exactly, over the bulk transport and over gRPC."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import torch
from wire_helpers.peers import PeerProcess
from wire_helpers.tensors import as_stream

from apiary.wire import ChannelPool, RpcClient, WireSettings
from apiary.wire.bulk import BulkClient
from apiary.wire.probe import PROBE, SINK_ROUTE
from apiary.wire.protos.wire_pb2 import PingRequest, SinkReply, SinkRequest
from apiary.wire.tensors import tensor_payload, tensors_to_chunks

GiB = 1 << 30

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def peer() -> Iterator[PeerProcess]:
    process = PeerProcess().start()  # default limits: 4 GiB tensors, 4 MiB chunks
    yield process
    process.stop()


@pytest.fixture(scope="module")
def gib_tensor() -> tuple[torch.Tensor, bytes]:
    """A 1 GiB float32 tensor in which every 8-byte word differs (a chunk lost, doubled or
    misplaced changes the digest), and the SHA-256 of its bytes."""
    words = torch.arange(GiB // 8, dtype=torch.int64).mul_(-7046029254386353131).add_(torch.randint(0, 1 << 62, ()))
    tensor = words.view(torch.float32).reshape(256, GiB // 1024)
    assert tensor.numel() * tensor.element_size() == GiB
    return tensor, hashlib.sha256(words.numpy()).digest()


@pytest.fixture
async def pool() -> AsyncIterator[ChannelPool]:
    async with ChannelPool(WireSettings(tls=False, default_timeout=120)) as pool:
        yield pool


async def test_one_gib_over_bulk(peer: PeerProcess, pool: ChannelPool, gib_tensor: tuple[torch.Tensor, bytes]) -> None:
    tensor, digest = gib_tensor
    client = BulkClient(WireSettings(tls=False, default_timeout=120))
    started = time.perf_counter()
    try:
        body, tensors = await client.call(
            peer.bulk_endpoint, SINK_ROUTE, body=SinkRequest(digest=True).SerializeToString(),
            tensors=[tensor_payload(tensor)],
        )  # fmt: skip
    finally:
        await client.close()
    seconds = time.perf_counter() - started
    reply = SinkReply.FromString(body)
    assert reply.total_bytes == GiB
    (received,) = reply.tensors
    assert received.header.dtype == "float32" and list(received.header.shape) == [256, GiB // 1024]
    assert received.sha256 == digest
    print(f"1 GiB over bulk in {seconds:.2f}s")
    assert (await RpcClient(pool, PROBE, peer.endpoint).call("Ping", PingRequest())).peer_id == peer.peer_id


async def test_one_gib_over_the_grpc_chunk_stream(
    peer: PeerProcess, pool: ChannelPool, gib_tensor: tuple[torch.Tensor, bytes]
) -> None:
    tensor, digest = gib_tensor
    started = time.perf_counter()
    reply: SinkReply = await RpcClient(pool, PROBE, peer.endpoint).call(
        "Sink", as_stream(tensors_to_chunks([tensor], pool.settings.chunk_bytes))
    )
    seconds = time.perf_counter() - started
    assert reply.total_bytes == GiB
    (received,) = reply.tensors
    assert received.sha256 == digest
    print(f"1 GiB over gRPC in {seconds:.2f}s")

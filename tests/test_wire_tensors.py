"""Tensors sent to another process through the gRPC chunk stream and the bulk transport, bit-exact."""

from __future__ import annotations

import hashlib
import math
from collections.abc import AsyncIterator, Iterator

import pytest
import torch
from wire_helpers.peers import PeerProcess
from wire_helpers.tensors import as_stream, assert_bit_exact, echo, random_tensor, raw_bytes, wire_dtypes

from apiary.wire import ChannelPool, RpcClient, WireSettings
from apiary.wire.bulk import BulkClient
from apiary.wire.chunks import DTYPE_ITEMSIZE
from apiary.wire.probe import PROBE, SINK_ROUTE
from apiary.wire.protos.wire_pb2 import PingRequest, SinkReply, SinkRequest
from apiary.wire.tensors import tensor_payload, tensors_to_chunks

SERVER_CHUNK_BYTES = 64 * 1024

# Torch dtypes that apiary knowingly does not send, and why. A torch release that adds a dtype
# fails test_every_torch_dtype_is_sent_or_knowingly_excluded until it is added to
# DTYPE_ITEMSIZE or listed here.
EXCLUDED_DTYPES = {
    **{f"uint{bits}": "sub-byte placeholder dtype without storage semantics in torch" for bits in range(1, 8)},
    **{f"int{bits}": "sub-byte placeholder dtype without storage semantics in torch" for bits in range(1, 8)},
    **dict.fromkeys(("bits1x8", "bits2x4", "bits4x2", "bits8", "bits16"), "opaque bit container with no arithmetic"),
    "float4_e2m1fn_x2": "packed pairs of fp4 values, not yet supported by apiary",
}


def _is_quantized(name: str) -> bool:
    return name.startswith(("qint", "quint"))


@pytest.fixture(scope="module")
def peer() -> Iterator[PeerProcess]:
    process = PeerProcess(["--chunk-bytes", str(SERVER_CHUNK_BYTES)]).start()
    yield process
    process.stop()


@pytest.fixture
async def pool() -> AsyncIterator[ChannelPool]:
    async with ChannelPool(WireSettings(tls=False, default_timeout=30)) as pool:
        yield pool


def test_every_torch_dtype_is_sent_or_knowingly_excluded() -> None:
    torch_dtypes = {
        str(value).removeprefix("torch."): value
        for value in vars(torch).values()
        if isinstance(value, torch.dtype)
    }
    unaccounted = []
    for name, dtype in sorted(torch_dtypes.items()):
        if _is_quantized(name) or dtype.itemsize < 1:
            continue
        if name in DTYPE_ITEMSIZE:
            assert DTYPE_ITEMSIZE[name] == dtype.itemsize, f"DTYPE_ITEMSIZE[{name!r}] disagrees with torch"
            assert name not in EXCLUDED_DTYPES, f"{name} is both sent and excluded"
        elif name not in EXCLUDED_DTYPES:
            unaccounted.append(name)
    assert not unaccounted, f"torch dtypes neither in DTYPE_ITEMSIZE nor excluded: {unaccounted}"
    assert set(wire_dtypes()) >= {"float32", "bfloat16", "float8_e4m3fn", "uint64", "complex32", "bool"}


@pytest.mark.parametrize("name", sorted(DTYPE_ITEMSIZE))
async def test_every_wire_dtype_round_trips_bit_exactly(name: str, peer: PeerProcess, pool: ChannelPool) -> None:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        pytest.skip(f"torch {torch.__version__} has no {name}")
    sent = random_tensor(dtype, (7, 13), seed=len(name))
    (received,), _ = await echo(pool, peer.endpoint, [sent], chunk_bytes=100)  # 100 does not divide 7*13*itemsize
    assert_bit_exact(received, sent)


async def test_one_stream_carries_many_tensors_in_order(peer: PeerProcess, pool: ChannelPool) -> None:
    sent = [random_tensor(getattr(torch, name), (3, 5, 2), seed=i) for i, name in enumerate(wire_dtypes())]
    received, _ = await echo(pool, peer.endpoint, sent, chunk_bytes=37)
    assert len(received) == len(sent)
    for got, expected in zip(received, sent, strict=True):
        assert_bit_exact(got, expected)


async def test_zero_dim_empty_and_non_contiguous_tensors(peer: PeerProcess, pool: ChannelPool) -> None:
    base = random_tensor(torch.float32, (6, 10), seed=1)
    sent = [
        torch.tensor(3.25, dtype=torch.float64),  # 0-d
        torch.empty((0, 5), dtype=torch.bfloat16),  # empty
        base.t(),  # transposed
        base[:, ::3],  # strided
        base[2:4],  # contiguous but at an offset into its storage
        torch.arange(5, dtype=torch.int16).expand(4, 5),  # stride 0
        random_tensor(torch.float16, (3, 4), seed=2).requires_grad_(),
    ]
    assert not sent[2].is_contiguous() and not sent[3].is_contiguous()
    received, _ = await echo(pool, peer.endpoint, sent, chunk_bytes=24)
    for got, expected in zip(received, sent, strict=True):
        assert_bit_exact(got, expected)
    assert received[0].dim() == 0 and received[0].item() == 3.25
    assert received[1].shape == (0, 5)
    assert torch.equal(received[2], base.t())  # the values, in the transposed layout
    assert received[2].is_contiguous()


async def test_a_tensor_spanning_many_chunks(peer: PeerProcess, pool: ChannelPool) -> None:
    sent = random_tensor(torch.float64, (300, 701), seed=3)  # 1,682,400 bytes
    nbytes = sent.numel() * sent.element_size()
    chunk_bytes = 100_003
    assert nbytes % chunk_bytes and nbytes % SERVER_CHUNK_BYTES  # neither chunk size divides it
    assert len(list(tensors_to_chunks([sent], chunk_bytes))) == math.ceil(nbytes / chunk_bytes)
    (received,), replies = await echo(pool, peer.endpoint, [sent], chunk_bytes=chunk_bytes)
    assert replies == math.ceil(nbytes / SERVER_CHUNK_BYTES)  # the peer streamed it back in its own chunks
    assert_bit_exact(received, sent)


async def test_sink_digests_match_what_was_sent(peer: PeerProcess, pool: ChannelPool) -> None:
    sent = [random_tensor(torch.bfloat16, (1000, 333), seed=4), torch.empty(0)]
    sent.append(random_tensor(torch.uint8, (5,), seed=5))
    client = RpcClient(pool, PROBE, peer.endpoint)
    reply: SinkReply = await client.call("Sink", as_stream(tensors_to_chunks(sent, 65_537)))
    assert [bytes(d.sha256) for d in reply.tensors] == [hashlib.sha256(raw_bytes(t).numpy()).digest() for t in sent]
    assert [list(d.header.shape) for d in reply.tensors] == [[1000, 333], [0], [5]]
    assert reply.total_bytes == sum(t.numel() * t.element_size() for t in sent)


async def test_bulk_transfers_keep_tensors_intact_on_a_reused_connection(peer: PeerProcess, pool: ChannelPool) -> None:
    """Several bulk calls on one connection; the peer receives into a buffer it reuses, so a
    large request, a smaller one and a larger one again must each arrive intact."""
    client = BulkClient(WireSettings(tls=False, default_timeout=30), max_idle_per_peer=1)
    body = SinkRequest(digest=True).SerializeToString()
    try:
        for round_, counts in enumerate([(3 << 18, 17), (5, 1 << 18), (2 << 18, 3 << 18, 0)]):  # float32 elements
            sent = [random_tensor(torch.float32, (n,), seed=round_ * 10 + i) for i, n in enumerate(counts)]
            reply_body, tensors = await client.call(peer.bulk_endpoint, SINK_ROUTE, body=body,
                                                    tensors=[tensor_payload(t) for t in sent])
            assert tensors == []
            reply = SinkReply.FromString(reply_body)
            assert [bytes(d.sha256) for d in reply.tensors] == [
                hashlib.sha256(raw_bytes(t).numpy()).digest() for t in sent
            ]
            assert reply.total_bytes == sum(t.numel() * 4 for t in sent)
            assert len(client._idle[peer.bulk_endpoint]) == 1  # the connection went back to the pool
    finally:
        await client.close()
    ping = await RpcClient(pool, PROBE, peer.endpoint).call("Ping", PingRequest())
    assert ping.peer_id == peer.peer_id

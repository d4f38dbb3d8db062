"""Limits and malformed input, against a peer in another process: each bad request gets a clear
error, and the peer keeps serving (a Ping right after succeeds)."""

# Plaintext here, asked for explicitly: these tests open raw channels and sockets to check the
# wire's own mechanics; the same paths over TLS (the default) are covered by test_trust_tls.py.

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import torch
from wire_helpers.peers import PeerProcess
from wire_helpers.tensors import as_stream

from apiary.wire import ChannelPool, OverLimit, RequestRejected, RpcClient, WireSettings
from apiary.wire.bulk import BulkClient
from apiary.wire.framing import MAGIC, MAX_TENSORS_PER_REQUEST
from apiary.wire.probe import PROBE, SINK_ROUTE
from apiary.wire.protos.wire_pb2 import (
    BulkReply,
    BulkRequest,
    PingRequest,
    SinkReply,
    SinkRequest,
    TensorChunk,
    TensorHeader,
)
from apiary.wire.tensors import tensor_payload

MiB = 1 << 20
MAX_TENSOR_BYTES = 1 * MiB
MAX_MESSAGE_BYTES = 2 * MiB


@pytest.fixture(scope="module")
def peer() -> Iterator[PeerProcess]:
    process = PeerProcess([
        "--max-tensor-bytes", str(MAX_TENSOR_BYTES),
        "--max-message-bytes", str(MAX_MESSAGE_BYTES),
        "--chunk-bytes", str(MiB),
    ]).start()  # fmt: skip
    yield process
    process.stop()


@pytest.fixture
async def pool() -> AsyncIterator[ChannelPool]:
    async with ChannelPool(WireSettings(tls=False, default_timeout=20)) as pool:
        yield pool


@pytest.fixture
async def bulk() -> AsyncIterator[BulkClient]:
    client = BulkClient(WireSettings(tls=False, default_timeout=20))
    yield client
    await client.close()


async def assert_still_serving(pool: ChannelPool, peer: PeerProcess, bulk: BulkClient | None = None) -> None:
    assert peer.alive()
    reply = await RpcClient(pool, PROBE, peer.endpoint).call("Ping", PingRequest(), timeout=10)
    assert reply.peer_id == peer.peer_id
    if bulk is not None:
        tensor = torch.arange(1000, dtype=torch.int32)
        body, _ = await bulk.call(peer.bulk_endpoint, SINK_ROUTE, body=SinkRequest().SerializeToString(),
                                  tensors=[tensor_payload(tensor)], timeout=10)
        assert SinkReply.FromString(body).total_bytes == 4000


async def sink(pool: ChannelPool, peer: PeerProcess, chunks: list[TensorChunk]) -> SinkReply:
    return await RpcClient(pool, PROBE, peer.endpoint).call("Sink", as_stream(chunks), timeout=10)


def header(dtype: str, shape: list[int], nbytes: int) -> TensorHeader:
    return TensorHeader(dtype=dtype, shape=shape, nbytes=nbytes)


async def test_grpc_tensor_above_max_tensor_bytes(pool: ChannelPool, peer: PeerProcess) -> None:
    too_big = header("float32", [MAX_TENSOR_BYTES // 4 + 1], MAX_TENSOR_BYTES + 4)
    with pytest.raises(OverLimit, match=f"max_tensor_bytes={MAX_TENSOR_BYTES}") as raised:
        await sink(pool, peer, [TensorChunk(header=too_big, data=b"\0" * 1024)])
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert raised.value.peer == str(peer.endpoint)
    # exactly at the limit is accepted
    at_limit = header("uint8", [MAX_TENSOR_BYTES], MAX_TENSOR_BYTES)
    reply = await sink(pool, peer, [TensorChunk(header=at_limit, data=b"\1" * MAX_TENSOR_BYTES)])
    assert reply.total_bytes == MAX_TENSOR_BYTES
    await assert_still_serving(pool, peer)


async def test_bulk_tensor_above_max_tensor_bytes(pool: ChannelPool, peer: PeerProcess, bulk: BulkClient) -> None:
    tensor = torch.zeros(MAX_TENSOR_BYTES // 2 + 1, dtype=torch.float16)
    with pytest.raises(OverLimit, match=f"max_tensor_bytes={MAX_TENSOR_BYTES}") as raised:
        await bulk.call(peer.bulk_endpoint, SINK_ROUTE, body=SinkRequest(digest=True).SerializeToString(),
                        tensors=[tensor_payload(tensor)])
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    await assert_still_serving(pool, peer, bulk)


async def test_grpc_message_above_max_message_bytes(pool: ChannelPool, peer: PeerProcess) -> None:
    oversized = TensorChunk(header=header("uint8", [3 * MiB], 3 * MiB), data=b"\0" * (3 * MiB))
    with pytest.raises(OverLimit) as raised:
        await sink(pool, peer, [oversized])
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in str(raised.value)
    await assert_still_serving(pool, peer)


async def test_garbage_bytes_instead_of_a_ping_request(pool: ChannelPool, peer: PeerProcess) -> None:
    raw_ping = pool.channel(peer.endpoint).unary_unary(
        "/apiary.wire.Probe/Ping", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await raw_ping(b"\xff\xff\xff\xff garbage", timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed apiary.wire.PingRequest" in (raised.value.details() or "")
    await assert_still_serving(pool, peer)


async def test_unknown_method_is_unimplemented(pool: ChannelPool, peer: PeerProcess) -> None:
    call = pool.channel(peer.endpoint).unary_unary("/apiary.wire.Probe/Nope")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(b"", timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    await assert_still_serving(pool, peer)


MALFORMED_STREAMS = {
    "ends mid-tensor": (
        [TensorChunk(header=header("float32", [100], 400), data=b"\0" * 100)],
        "the stream ended after 100 of 400 bytes",
    ),
    "chunk without header": ([TensorChunk(data=b"abc")], "without a header"),
    "more bytes than declared": (
        [TensorChunk(header=header("float32", [2], 8), data=b"\0" * 4), TensorChunk(data=b"\0" * 8)],
        "more than the 8 bytes its header declares",
    ),
    "unknown dtype": (
        [TensorChunk(header=header("float128", [1], 16), data=b"\0" * 16)],
        "dtype 'float128' is not supported",
    ),
    "nbytes mismatch": (
        [TensorChunk(header=header("float32", [3], 10), data=b"\0" * 10)],
        r"says 10 bytes but float32\[3\] needs 12",
    ),
    "negative dimension": ([TensorChunk(header=header("int8", [-1, 4], 0))], "negative dimension"),
    "header before the previous tensor is complete": (
        [TensorChunk(header=header("int8", [4], 4), data=b"ab"), TensorChunk(header=header("int8", [1], 1), data=b"c")],
        "a new tensor header arrived after 2 of 4 bytes",
    ),
}


@pytest.mark.parametrize("method", ["Sink", "Echo"])
@pytest.mark.parametrize("case", sorted(MALFORMED_STREAMS))
async def test_malformed_chunk_streams(case: str, method: str, pool: ChannelPool, peer: PeerProcess) -> None:
    chunks, complaint = MALFORMED_STREAMS[case]
    client = RpcClient(pool, PROBE, peer.endpoint, timeout=10)
    with pytest.raises(RequestRejected, match=complaint) as raised:
        if method == "Sink":
            await client.call("Sink", as_stream(chunks))
        else:
            async for _ in client.stream("Echo", as_stream(chunks)):
                pass
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"apiary.wire.Probe/{method}" in str(raised.value)
    await assert_still_serving(pool, peer)


def bulk_exchange(peer: PeerProcess, data: bytes) -> BulkReply:
    """Sends raw bytes to the bulk port and reads the one reply frame the peer answers with."""
    with socket.create_connection(("127.0.0.1", peer.bulk_endpoint.port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    size = int.from_bytes(received[:4], "big")
    assert len(received) == 4 + size, "the peer sent more than one frame, or a truncated one"
    return BulkReply.FromString(received[4:])


async def test_bulk_bad_preamble(pool: ChannelPool, peer: PeerProcess, bulk: BulkClient) -> None:
    # e.g. someone pointing an HTTP client at the bulk port
    reply = bulk_exchange(peer, b"GET / HTTP/1.1\r\nHost: peer\r\n\r\n" + b"x" * 10_000)
    assert reply.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "bad preamble" in reply.details
    await assert_still_serving(pool, peer, bulk)


@pytest.mark.parametrize(
    ("frame", "code", "complaint"),
    [
        ((10).to_bytes(4, "big") + b"\xff" * 10, grpc.StatusCode.INVALID_ARGUMENT, "malformed apiary.wire.BulkRequest"),
        ((1 << 31).to_bytes(4, "big") + b"\0" * 100, grpc.StatusCode.RESOURCE_EXHAUSTED, "max_message_bytes"),
        (
            BulkRequest(route=SINK_ROUTE, tensors=[header("int8", [4], 5)]).SerializeToString(),
            grpc.StatusCode.INVALID_ARGUMENT,
            "says 5 bytes",
        ),
    ],
    ids=["garbage", "huge-length", "bad-header"],
)
async def test_bulk_garbage_frame(
    frame: bytes, code: grpc.StatusCode, complaint: str, pool: ChannelPool, peer: PeerProcess, bulk: BulkClient
) -> None:
    if frame.startswith(b"\n"):  # a serialized BulkRequest: add its length prefix
        frame = len(frame).to_bytes(4, "big") + frame
    reply = bulk_exchange(peer, MAGIC + frame)
    assert reply.code == code.value[0]
    assert complaint in reply.details
    await assert_still_serving(pool, peer, bulk)


async def test_bulk_client_hanging_up_mid_tensor(pool: ChannelPool, peer: PeerProcess, bulk: BulkClient) -> None:
    request = BulkRequest(route=SINK_ROUTE, tensors=[TensorHeader(dtype="uint8", shape=[1000], nbytes=1000)])
    frame = request.SerializeToString()
    with socket.create_connection(("127.0.0.1", peer.bulk_endpoint.port), timeout=10) as sock:
        sock.sendall(MAGIC + len(frame).to_bytes(4, "big") + frame + b"\0" * 10)
    await assert_still_serving(pool, peer, bulk)


async def test_bulk_unknown_route(pool: ChannelPool, peer: PeerProcess, bulk: BulkClient) -> None:
    with pytest.raises(RequestRejected, match="no bulk route 'apiary.nothing/Here'") as raised:
        await bulk.call(peer.bulk_endpoint, "apiary.nothing/Here", tensors=[tensor_payload(torch.ones(10))])
    assert raised.value.code == grpc.StatusCode.UNIMPLEMENTED
    await assert_still_serving(pool, peer, bulk)


async def test_bulk_too_many_tensors_in_one_request(pool: ChannelPool, peer: PeerProcess, bulk: BulkClient) -> None:
    empty = tensor_payload(torch.empty(0))
    count = MAX_TENSORS_PER_REQUEST + 1
    with pytest.raises(RequestRejected, match=f"{count} tensors in one request exceed the limit of {count - 1}"):
        await bulk.call(peer.bulk_endpoint, SINK_ROUTE, tensors=[empty] * count)
    body, _ = await bulk.call(peer.bulk_endpoint, SINK_ROUTE, body=SinkRequest(digest=True).SerializeToString(),
                              tensors=[empty] * (count - 1))
    assert len(SinkReply.FromString(body).tensors) == count - 1
    await assert_still_serving(pool, peer, bulk)

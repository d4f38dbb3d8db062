"""Fuzz targets: the decoders that take bytes from remote peers, each as a function of one byte
string. A target returns normally when its input is decoded or refused with the documented
error (a `RequestError`, what a handler refuses with; `ValueError` from the averaging codecs); any other
exception, or a broken invariant (an `AssertionError`), is a finding.

Run them with atheris (`python fuzz/run.py TARGET`), with the hypothesis fallback (the same
command where atheris is not installed), or for a minute each with `benchmarks/fuzz.py`.
"""

from __future__ import annotations

import asyncio
import atexit
import socket
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import hpack

from apiary.averaging.compression import CODECS, codec_by_name
from apiary.averaging.matchmaking import MATCHMAKING
from apiary.averaging.protos.averaging_pb2 import ReduceRequest, StateRequest
from apiary.dht.messages import check_items, contact_of
from apiary.dht.node import NODE_SERVICE
from apiary.dht.protos.dht_pb2 import FindRequest, PingRequest, StoreRequest
from apiary.dht.validation import DHTRecord, SignatureValidator
from apiary.wire import Identity, RequestError, RpcServer, WireSettings
from apiary.wire.chunks import ChunkAssembler
from apiary.wire.framing import MAX_TENSORS_PER_REQUEST, parse_request
from apiary.wire.limits import ByteBudget
from apiary.wire.probe import PROBE
from apiary.wire.protos.wire_pb2 import SinkRequest, TensorChunk
from apiary.wire.rpc import decode
from apiary.wire.tensors import deserialize_tensor, tensor_from_payload

MAX_TENSOR_BYTES = 1 << 20
SETTINGS = WireSettings(max_tensor_bytes=MAX_TENSOR_BYTES, max_bytes_in_flight=4 * MAX_TENSOR_BYTES)


def _public_request_types() -> list[type]:
    """The request message of every public gRPC method and bulk route, in a fixed order."""
    types: list[type] = []
    specs = [PROBE, NODE_SERVICE, MATCHMAKING]
    try:  # the MoE service imports more of torch; fuzzed where it imports
        from apiary.moe.server import EXPERTS_SERVICE

        specs.append(EXPERTS_SERVICE)
    except ImportError:
        pass
    for spec in specs:
        types.extend(method.request for method in spec.methods if method.request not in types)
    types.extend(t for t in (ReduceRequest, StateRequest, SinkRequest) if t not in types)  # bulk route bodies
    return types


REQUEST_TYPES = _public_request_types()
_VALIDATOR = SignatureValidator()


def rpc_request(data: bytes) -> None:
    """The first byte picks a public request type; the rest is decoded as it, then checked as the
    DHT node checks what it decoded (senders, store items and their signatures)."""
    if not data:
        return
    message_type = REQUEST_TYPES[data[0] % len(REQUEST_TYPES)]
    try:
        request = decode(message_type, data[1:])
    except RequestError:
        return
    if isinstance(request, (PingRequest, StoreRequest, FindRequest)):
        contact_of(request.sender)
    if isinstance(request, StoreRequest):
        try:
            check_items(list(request.items), 64)
        except RequestError:
            return
        for item in request.items:
            _VALIDATOR.validate(DHTRecord(item.key, item.subkey if item.has_subkey else None, item.value,
                                          item.expiration))


def _messages(data: bytes) -> Iterator[bytes]:
    """Cuts `data` into length-prefixed pieces (a 2-byte length, then that many bytes)."""
    offset = 0
    while offset + 2 <= len(data):
        size = int.from_bytes(data[offset : offset + 2], "big")
        yield data[offset + 2 : offset + 2 + size]
        offset += 2 + size


def tensor_message(data: bytes) -> None:
    """A single-message tensor (`TensorChunk` with header and data), as experts receive them."""
    try:
        tensor = deserialize_tensor(decode(TensorChunk, data), MAX_TENSOR_BYTES)
    except RequestError:
        return
    assert tensor.numel() * tensor.element_size() <= MAX_TENSOR_BYTES


def chunk_stream(data: bytes) -> None:
    """A stream of tensor chunks (length-prefixed `TensorChunk`s), as Echo and Sink receive it,
    reassembled under a budget of bytes in flight that must be whole again afterwards."""
    budget = ByteBudget(SETTINGS.max_bytes_in_flight)
    try:
        with ChunkAssembler(MAX_TENSOR_BYTES, budget) as assembler:
            for raw in _messages(data):
                done = assembler.feed(decode(TensorChunk, raw))
                if done is not None:
                    tensor_from_payload(*done)
            assembler.close()
    except RequestError:
        pass
    assert budget.used == 0, f"{budget.used} bytes still reserved after the stream"


def bulk_frame(data: bytes) -> None:
    """A bulk request frame: the request and its tensor headers, checked before any allocation."""
    try:
        request = parse_request(data, SETTINGS)
    except RequestError:
        return
    assert len(request.tensors) <= MAX_TENSORS_PER_REQUEST
    assert all(0 <= header.nbytes <= MAX_TENSOR_BYTES for header in request.tensors)


def codec_part(data: bytes) -> None:
    """An averaging part: the first byte picks a codec, the second a span size, the rest are its
    tensors (length-prefixed single-message `TensorChunk`s); decoded as a reducer decodes it."""
    if len(data) < 2:
        return
    names = sorted(CODECS)
    codec = codec_by_name(names[data[0] % len(names)])
    try:
        tensors = [deserialize_tensor(decode(TensorChunk, raw), MAX_TENSOR_BYTES) for raw in _messages(data[2:])]
        codec.decode(tensors, data[1])
    except (RequestError, ValueError):  # a malformed message, a codec's check
        pass


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEADERS, _SETTINGS, _END_STREAM_AND_HEADERS = 1, 4, 0x5


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + (stream & 0x7FFFFFFF).to_bytes(4, "big") + payload


def http2_bytes(data: bytes) -> bytes:
    """What a client sends on a fresh connection, after the preface and its SETTINGS: the first
    byte picks (0) `data` as is, (1) one request whose `:path` is `data` (any bytes), (2) frames
    cut from `data` (type, flags, stream and length bytes, then the payload)."""
    start = HTTP2_PREFACE + _frame(_SETTINGS, 0, 0, b"")
    mode, rest = (data[0] % 3, data[1:]) if data else (0, b"")
    if mode == 0:
        return start + rest
    if mode == 1:
        block = hpack.Encoder().encode([(b":method", b"POST"), (b":scheme", b"http"), (b":path", rest),
                                        (b":authority", b"apiary"), (b"content-type", b"application/grpc"),
                                        (b"te", b"trailers")], huffman=False)
        return start + _frame(_HEADERS, _END_STREAM_AND_HEADERS, 1, block)
    frames, offset = [], 0
    while offset + 4 <= len(rest):
        kind, flags, stream, length = rest[offset : offset + 4]
        frames.append(_frame(kind % 10, flags, stream, rest[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    return start + b"".join(frames)


def answers_ping(address: str, within: float) -> bool:
    """Whether the gRPC server at `address` answers a Probe Ping within `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        with grpc.insecure_channel(address) as channel:  # a fresh one: no reconnection backoff left from a refusal
            try:
                channel.unary_unary("/apiary.wire.Probe/Ping")(b"", timeout=1)
                return True
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    return False
        time.sleep(0.02)


class _LiveServer:
    """A plaintext RpcServer on 127.0.0.1 with its own event loop in a daemon thread, stopped at exit."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="fuzz-live-server").start()
        self.server = RpcServer(WireSettings(listen_host="127.0.0.1", bulk=False, tls=False), Identity.generate())
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        self.address = str(self.server.local_endpoint)
        atexit.register(self.close)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


_live: _LiveServer | None = None


def http2_frames(data: bytes) -> None:
    """Raw HTTP/2 (`http2_bytes`) at a live gRPC server: whatever arrives, the server still answers
    a clean call afterwards (within the few seconds a restart may take)."""
    global _live
    if _live is None:
        _live = _LiveServer()
    host, port = _live.address.rsplit(":", 1)
    assert answers_ping(_live.address, 10), "the server no longer answers"  # it may be restarting still
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        try:
            sock.sendall(http2_bytes(data))
        except OSError:
            pass  # the server may hang up on garbage mid-send
    assert answers_ping(_live.address, 10), f"the server no longer answers after {data!r}"


def noop(data: bytes) -> None:
    """Decodes nothing: the fuzzing engine's own speed, the reference `benchmarks/fuzz.py` divides by."""


TARGETS: dict[str, Callable[[bytes], None]] = {
    "noop": noop,
    "rpc_request": rpc_request,
    "tensor_message": tensor_message,
    "chunk_stream": chunk_stream,
    "bulk_frame": bulk_frame,
    "codec_part": codec_part,
    "http2_frames": http2_frames,
}


def seeds() -> dict[str, list[bytes]]:
    """Valid inputs for each target, from which the fuzzers mutate (decoding happens in C, where
    coverage is not traced, so random bytes alone rarely get past the first checks)."""
    import torch

    from apiary.dht.protos.dht_pb2 import NodeInfo, StoreItem
    from apiary.wire.protos.wire_pb2 import BulkRequest
    from apiary.wire.tensors import serialize_tensor, tensor_payload, tensors_to_chunks

    def framed(messages: list[bytes]) -> bytes:
        return b"".join(len(m).to_bytes(2, "big") + m for m in messages)

    tensors = [torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.ones(3, dtype=torch.bfloat16),
               torch.tensor(True), torch.zeros(0, 4, dtype=torch.int64)]
    sender = NodeInfo(peer_id="a" * 52, address="127.0.0.1:1234")
    store = StoreRequest(sender=sender, items=[StoreItem(key=b"\xa3key", has_subkey=True, subkey=b"\xa1s",
                                                         value=b"\x01", expiration=1e9)])
    requests = {StoreRequest: store, FindRequest: FindRequest(sender=sender, key_ids=[b"\x01" * 20]),
                ReduceRequest: ReduceRequest(group_id="g", sender="a" * 52, span=1, weight=1.0, codec="none", numel=4)}
    codecs = sorted(CODECS)
    part = torch.linspace(-1, 1, 16)
    return {
        "rpc_request": [bytes([REQUEST_TYPES.index(t)]) + m.SerializeToString() for t, m in requests.items()],
        "tensor_message": [serialize_tensor(t).SerializeToString() for t in tensors],
        "chunk_stream": [framed([c.SerializeToString() for c in tensors_to_chunks(tensors, 8)])],
        "bulk_frame": [BulkRequest(route="r", body=b"b", tensors=[tensor_payload(t)[0] for t in tensors],
                                   metadata={"k": "v"}).SerializeToString()],
        "noop": [b""],
        "http2_frames": [b"\x01/apiary.wire.Probe/Ping", b"\x02" + bytes([8, 0, 0, 4]) + b"\x00\x00\x00\x01"],
        "codec_part": [bytes([index, 16]) + framed([serialize_tensor(t).SerializeToString()
                                                    for t in codec_by_name(name).encode(part)])
                       for index, name in enumerate(codecs)],
    }

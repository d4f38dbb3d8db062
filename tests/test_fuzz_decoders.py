"""Property-based tests of everything that decodes what a remote peer sends: every public RPC's
request decoder, the bulk frame parser and route handlers, the tensor deserializers and the
averaging codecs. The only failures allowed are the documented ones (a `RequestError`, what a
handler refuses with; `ValueError` from codecs; gRPC statuses that name the request as bad), within a
deadline (no hang). The end-to-end part sends raw bytes, raw HTTP/2 frames and random tensor
streams to real `apiary dht` and `apiary averager` processes, then checks that they still serve.

The fuzz targets of `fuzz/targets.py` (run for longer by atheris, `benchmarks/fuzz.py`) get the
same hypothesis treatment here."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from service_processes import ServiceProcess, ServiceProcesses

from apiary.averaging.allreduce import AllReduceService
from apiary.averaging.compression import CODECS, codec_by_name
from apiary.averaging.state import StateDonor
from apiary.wire import Endpoint, Identity, RequestError, WireSettings
from apiary.wire.bulk import BulkCall
from apiary.wire.chunks import DTYPE_ITEMSIZE, ChunkAssembler
from apiary.wire.framing import MAGIC
from apiary.wire.limits import ByteBudget
from apiary.wire.probe import ProbeService
from apiary.wire.reachability import DialBacks
from apiary.wire.protos.wire_pb2 import BulkReply, BulkRequest, TensorChunk, TensorHeader
from apiary.wire.tensors import deserialize_tensor, tensor_from_payload

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
import targets  # noqa: E402 - fuzz/targets.py, the fuzzing entry points

MAX_TENSOR_BYTES = 1 << 16
FAST = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
REMOTE = settings(max_examples=120, deadline=5000, suppress_health_check=list(HealthCheck))
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNAUTHENTICATED}

headers = st.builds(
    TensorHeader,
    dtype=st.one_of(st.sampled_from(sorted(DTYPE_ITEMSIZE)), st.text(max_size=12)),
    shape=st.lists(st.integers(-(1 << 63), (1 << 63) - 1) | st.integers(-2, 64), max_size=5),
    nbytes=st.integers(-(1 << 63), (1 << 63) - 1) | st.integers(0, 4096),
)
chunks = st.builds(TensorChunk, header=st.none() | headers, data=st.binary(max_size=512)).map(
    lambda chunk: chunk if chunk.HasField("header") or chunk.data else TensorChunk(data=chunk.data)
)


# ---- the fuzz targets, under hypothesis ----


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_fuzz_target(name: str) -> None:
    target = targets.TARGETS[name]

    @FAST
    @given(st.one_of(st.binary(max_size=2048), st.sampled_from(targets.seeds()[name])))
    def fuzz(data: bytes) -> None:
        target(data)

    fuzz()


def test_every_public_request_type_is_fuzzed() -> None:
    names = {t.DESCRIPTOR.full_name for t in targets.REQUEST_TYPES}
    assert {"apiary.dht.StoreRequest", "apiary.dht.FindRequest", "apiary.wire.TensorChunk",
            "apiary.averaging.JoinRequest", "apiary.averaging.ReduceRequest", "apiary.averaging.StateRequest",
            "apiary.wire.SinkRequest"} <= names


# ---- structured inputs for the tensor deserializers ----


@FAST
@given(headers, st.binary(max_size=4096))
def test_deserialize_tensor_accepts_consistent_messages_only(header: TensorHeader, data: bytes) -> None:
    try:
        tensor = deserialize_tensor(TensorChunk(header=header, data=data), MAX_TENSOR_BYTES)
    except RequestError:
        return
    assert tensor.numel() * tensor.element_size() == header.nbytes == len(data) <= MAX_TENSOR_BYTES
    assert list(tensor.shape) == list(header.shape)


@FAST
@given(st.lists(chunks, max_size=12))
def test_chunk_streams_reassemble_or_are_refused_and_give_back_their_bytes(stream: list[TensorChunk]) -> None:
    budget = ByteBudget(2 * MAX_TENSOR_BYTES)
    try:
        with ChunkAssembler(MAX_TENSOR_BYTES, budget) as assembler:
            for chunk in stream:
                done = assembler.feed(chunk)
                assert budget.used <= MAX_TENSOR_BYTES  # one tensor at a time, never more than the limit
                if done is not None:
                    header, payload = done
                    assert len(payload) == header.nbytes
                    tensor_from_payload(header, payload)
            assembler.close()
    except RequestError:
        pass
    assert budget.used == 0


@FAST
@given(st.sampled_from(sorted(CODECS)), st.integers(0, 64),
       st.lists(st.tuples(st.sampled_from(["float32", "float16", "uint8", "int64", "bfloat16"]),
                          st.lists(st.integers(0, 40), max_size=2), st.binary(max_size=400)), max_size=4))
def test_codecs_decode_untrusted_parts_or_raise_value_error(name: str, numel: int,
                                                           raw: list[tuple[str, list[int], bytes]]) -> None:
    tensors = []
    for dtype, shape, data in raw:
        nbytes = DTYPE_ITEMSIZE[dtype] * (shape[0] if shape else 1) * (shape[1] if len(shape) > 1 else 1)
        data = (data * (nbytes // max(1, len(data)) + 1))[:nbytes] if data else bytes(nbytes)
        tensors.append(tensor_from_payload(TensorHeader(dtype=dtype, shape=shape, nbytes=nbytes), bytearray(data)))
    try:
        decoded = codec_by_name(name).decode(tensors, numel)
    except ValueError:
        return
    assert decoded.shape == (numel,) and decoded.dtype == torch.float32


# ---- bulk route handlers, called with untrusted bodies and tensors ----


def bulk_calls() -> st.SearchStrategy[BulkCall]:
    tensor = st.tuples(headers, st.binary(max_size=64)).map(lambda t: (t[0], bytearray(t[1])))
    return st.builds(BulkCall, route=st.just("fuzz"), body=st.binary(max_size=256),
                     tensors=st.lists(tensor, max_size=3), peer=st.just("127.0.0.1:1"))


@FAST
@given(bulk_calls())
def test_bulk_route_handlers_refuse_malformed_calls_with_invalid_request(call: BulkCall) -> None:
    probe = ProbeService(Identity.generate(), Endpoint("127.0.0.1", 1), None, WireSettings())
    donor = StateDonor("run", "a" * 52)
    reductions = AllReduceService(registration_timeout=0.01)
    dial_backs = DialBacks(WireSettings(), Identity.generate())

    async def serve() -> None:
        for handler in (probe.bulk_sink, donor.handle, reductions.handle, dial_backs.bulk_nonce):
            try:
                await asyncio.wait_for(handler(call), 2)
            except RequestError:
                pass

    asyncio.run(serve())


# ---- real processes: raw bytes to every public gRPC method and to the bulk port ----


@pytest.fixture(scope="module")
def swarm() -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    with ServiceProcesses() as services:
        # plaintext, asked for: the raw bytes below must reach the decoders, not a TLS handshake
        dht = services.start("dht", "--new-swarm", "--plaintext").wait_until_up()
        averager = services.start("averager", "--run-id", "fuzz", "--initial-peers", dht.initial_peers,
                                  "--join-seconds", "0.05", "--plaintext").wait_until_up()
        yield dht, averager


def public_endpoints(service: ServiceProcess) -> tuple[str, str | None]:
    """The gRPC (and bulk, if any) endpoints a service printed."""
    if match := re.search(r"public: (\S+) \(bulk (\S+)\)", service.output):
        return match.group(1), match.group(2)
    return service.initial_peers.split("@", 1)[1], None


METHODS = [
    ("dht", "/apiary.dht.Node/Ping"), ("dht", "/apiary.dht.Node/Store"), ("dht", "/apiary.dht.Node/Find"),
    ("dht", "/apiary.wire.Probe/Ping"), ("dht", "/apiary.wire.Probe/DialBack"), ("dht", "/apiary.wire.Probe/Nonce"),
    ("averager", "/apiary.averaging.Matchmaking/Join"),
    ("averager", "/apiary.wire.Probe/Ping"),
]  # fmt: skip


def test_raw_bytes_to_every_public_method_get_an_answer_or_a_refusal(swarm: tuple[ServiceProcess, ServiceProcess]) -> None:
    dht, averager = swarm
    channels = {name: grpc.insecure_channel(public_endpoints(process)[0])
                for name, process in (("dht", dht), ("averager", averager))}
    try:
        calls = [(path, channels[name].unary_unary(path)) for name, path in METHODS]  # bytes in, bytes out

        @REMOTE
        @given(st.sampled_from(calls), st.binary(max_size=1024))
        @example(calls[1], targets.seeds()["rpc_request"][0][1:])  # a well-formed Store
        def fuzz(call: tuple[str, grpc.UnaryUnaryMultiCallable], data: bytes) -> None:
            path, method = call
            try:
                method(data, timeout=4)
            except grpc.RpcError as e:
                assert e.code() in REFUSALS, f"{path}: {e.code()}: {e.details()}"

        fuzz()
        for name, process in (("dht", dht), ("averager", averager)):
            assert process.process.poll() is None
            channels[name].unary_unary("/apiary.wire.Probe/Ping")(b"", timeout=5)  # still serving
    finally:
        for channel in channels.values():
            channel.close()


def test_raw_http2_at_every_public_grpc_port_leaves_it_serving(swarm: tuple[ServiceProcess, ServiceProcess]) -> None:
    addresses = [public_endpoints(process)[0] for process in swarm]

    @REMOTE
    @given(st.sampled_from(addresses), st.binary(max_size=512))
    @example(addresses[0], b"\x01/apiary.wire.Probe/\xff\xfe")  # a :path that is not UTF-8
    def fuzz(address: str, data: bytes) -> None:
        endpoint = Endpoint.parse(address)
        assert targets.answers_ping(address, 10), f"{address} no longer answers"
        with socket.create_connection((endpoint.host, endpoint.port), timeout=5) as sock:
            with contextlib.suppress(OSError):
                sock.sendall(targets.http2_bytes(data))
        assert targets.answers_ping(address, 10), f"{address} no longer answers after {data!r}"

    fuzz()
    for process in swarm:
        assert process.process.poll() is None
        assert process.get("/healthz").status_code == 200


async def test_random_tensor_streams_to_echo_get_a_clear_refusal(swarm: tuple[ServiceProcess, ServiceProcess]) -> None:
    dht, _ = swarm
    generator = random.Random(13)
    async with grpc.aio.insecure_channel(public_endpoints(dht)[0]) as channel:
        echo = channel.stream_stream("/apiary.wire.Probe/Echo")  # bytes in, bytes out
        for _ in range(200):
            messages = [generator.randbytes(generator.randint(0, 64)) for _ in range(generator.randint(1, 3))]
            try:
                async for _ in echo(_stream(messages), timeout=4):
                    pass
            except grpc.aio.AioRpcError as e:  # before: some were INTERNAL ("Internal error from Core")
                assert e.code() in REFUSALS, f"{messages!r}: {e.code()}: {e.details()}"


async def _stream(messages: list[bytes]) -> AsyncIterator[bytes]:
    for message in messages:
        yield message


def bulk_exchange(endpoint: str, payload: bytes) -> BulkReply | None:
    """Sends the preamble and `payload`; returns the reply frame, or None if the peer closed first."""
    host, port = Endpoint.parse(endpoint).host, Endpoint.parse(endpoint).port
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.settimeout(15)  # a hang fails the example (a Reduce part for an unknown round may wait 5 s for it)
        try:
            sock.sendall(MAGIC + payload)
            sock.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            return None
    if len(received) < 4:
        return None
    size = int.from_bytes(received[:4], "big")
    return BulkReply.FromString(received[4 : 4 + size])


def frames() -> st.SearchStrategy[bytes]:
    routes = st.sampled_from(["apiary.averaging/Reduce", "apiary.averaging/State", "apiary.wire.Probe/Sink", "x"])
    requests = st.builds(BulkRequest, route=routes, body=st.binary(max_size=128), tensors=st.lists(headers, max_size=3))
    framed = requests.map(lambda r: r.SerializeToString()).map(lambda f: len(f).to_bytes(4, "big") + f)
    return st.one_of(st.binary(max_size=512), st.tuples(framed, st.binary(max_size=512)).map(lambda t: t[0] + t[1]))


def test_raw_frames_to_the_bulk_port_get_a_reply_or_a_close(swarm: tuple[ServiceProcess, ServiceProcess]) -> None:
    _, averager = swarm
    bulk = public_endpoints(averager)[1]
    assert bulk is not None

    @REMOTE
    @given(frames())
    @example(b"\x00\x00\x00\x19\n\x17apiary.averaging/Reduce")  # a Reduce part naming no round: refused at once
    def fuzz(payload: bytes) -> None:
        reply = bulk_exchange(bulk, payload)
        if reply is not None and reply.code:
            assert grpc.StatusCode.INTERNAL.value[0] != reply.code, reply.details

    fuzz()
    assert averager.process.poll() is None
    reply = bulk_exchange(bulk, b"")  # still accepting
    assert reply is None

"""The averager's local API: how a trainer hands its tensors to its participant's averager.

`LOCAL_SERVICE` is served by the averager service on a local-only port (`LocalServicer`);
`AveragerClient` is the trainer's side. The trainer first registers the dtypes and shapes of
the tensors it wants averaged (the schema), then asks for one round at a time:

- through shared memory (trainer and averager on one host: same pod, same compose bundle):
  the trainer creates a segment holding its tensors flattened to float32, the averager maps
  it, and `AverageShared` averages in place there; no tensor crosses gRPC;
- through gRPC streaming otherwise: `Average` streams the tensors in and the averaged ones back.

A trainer that knows when its next round comes (the epoch's end) calls `Prepare` a little
earlier: the group forms while it computes, and the round goes straight to the all-reduce.

Besides rounds, the trainer publishes its state (`PublishState`: metadata and tensors), which
the averager keeps and serves to newcomers even while the trainer is busy or gone, and loads
the swarm's newest state (`LoadState`) when it starts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import mmap
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import grpc
import msgpack
import torch

from apiary.averaging.allreduce import unflatten_into
from apiary.averaging.averager import Averager
from apiary.averaging.matchmaking import schema_digest
from apiary.dht.interface import DHTLike
from apiary.averaging.spans import Role
from apiary.averaging.protos.local_pb2 import (
    AverageHeader,
    AverageReply,
    AverageRequest,
    AverageSharedReply,
    AverageSharedRequest,
    LoadStateReply,
    LoadStateRequest,
    PrepareReply,
    PrepareRequest,
    PublishStateReply,
    PublishStateRequest,
    RegisterReply,
    RegisterRequest,
    RoundOutcome,
)
from apiary.averaging.state import State, StateDonor, StateTransferError, download_state
from apiary.wire import (
    CallContext,
    ChannelPool,
    Endpoint,
    InvalidRequest,
    Method,
    NotFoundHere,
    PayloadTooLarge,
    RemoteFailure,
    RequestRejected,
    RpcClient,
    RequestError,
    ServiceSpec,
    WireError,
    WireSettings,
    WrongState,
)
from apiary.wire.bulk import BulkClient
from apiary.wire.chunks import ChunkAssembler, check_header, make_header
from apiary.wire.framing import MAX_TENSORS_PER_REQUEST
from apiary.wire.protos.wire_pb2 import TensorChunk, TensorHeader
from apiary.wire.tensors import dtype_name, tensor_from_payload, tensors_to_chunks, torch_dtype

logger = logging.getLogger(__name__)

LOCAL_SERVICE = ServiceSpec(
    "apiary.averaging.Local",
    (
        Method("Register", RegisterRequest, RegisterReply),
        Method("Average", AverageRequest, AverageReply, client_streaming=True, server_streaming=True),
        Method("AverageShared", AverageSharedRequest, AverageSharedReply),
        Method("Prepare", PrepareRequest, PrepareReply),
        Method("PublishState", PublishStateRequest, PublishStateReply, client_streaming=True),
        Method("LoadState", LoadStateRequest, LoadStateReply, server_streaming=True),
    ),
    local=True,
)

OK, NO_GROUP, FAILED = "ok", "no_group", "failed"
MAX_REGISTERED_TENSORS = MAX_TENSORS_PER_REQUEST


class NotRegistered(WrongState):
    """The call needs a registration (or a shared-memory one) first: FAILED_PRECONDITION."""


class StateUnavailable(NotFoundHere):
    """No donor gave a state in time: NOT_FOUND."""


# ---------------------------------------------------------------- schema


@dataclass(frozen=True)
class Schema:
    """The dtypes and shapes of the tensors a trainer averages, in order."""

    tensors: tuple[tuple[str, tuple[int, ...]], ...]  # (torch dtype name without "torch.", shape)

    @classmethod
    def of_tensors(cls, tensors: Sequence[torch.Tensor]) -> Schema:
        return cls(tuple((dtype_name(t.dtype), tuple(t.shape)) for t in tensors))

    @classmethod
    def of_headers(cls, headers: Sequence[TensorHeader], max_tensor_bytes: int) -> Schema:
        """The schema a Register request declares; raises InvalidRequest naming what is wrong."""
        if not headers:
            raise InvalidRequest("register at least one tensor")
        if len(headers) > MAX_REGISTERED_TENSORS:
            raise InvalidRequest(f"{len(headers)} tensors registered; the limit is {MAX_REGISTERED_TENSORS}")
        entries = []
        for index, header in enumerate(headers):
            try:
                check_header(header, max_tensor_bytes)
                dtype = torch_dtype(header.dtype)
            except (InvalidRequest, PayloadTooLarge) as e:
                raise type(e)(f"tensor {index}: {e}") from None
            if not dtype.is_floating_point:
                raise InvalidRequest(f"tensor {index}: dtype {header.dtype} cannot be averaged (floating-point only)")
            entries.append((header.dtype, tuple(header.shape)))
        schema = cls(tuple(entries))
        if schema.numel == 0:
            raise InvalidRequest("the registered tensors hold no elements")
        return schema

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def numels(self) -> list[int]:
        return [math.prod(shape) for _, shape in self.tensors]

    @property
    def numel(self) -> int:
        return sum(self.numels)

    @property
    def digest(self) -> str:
        """What averagers compare to average together (as `Averager` computes it from tensors)."""
        return schema_digest([(shape, str(torch_dtype(dtype))) for dtype, shape in self.tensors])

    def headers(self) -> list[TensorHeader]:
        return [make_header(dtype, shape, numel * torch_dtype(dtype).itemsize)
                for (dtype, shape), numel in zip(self.tensors, self.numels)]

    @staticmethod
    def describe(dtype: str, shape: Sequence[int]) -> str:
        return f"{dtype}{list(shape)}"

    def check(self, index: int, dtype: str, shape: Sequence[int]) -> None:
        """Raises InvalidRequest unless tensor `index` may have this dtype and shape."""
        if index >= len(self.tensors):
            raise InvalidRequest(f"tensor {index} is one too many: the registered schema has {len(self.tensors)} tensors")
        expected = self.tensors[index]
        if (dtype, tuple(shape)) != expected:
            raise InvalidRequest(
                f"tensor {index} is {self.describe(dtype, shape)}, the registered schema has "
                f"{self.describe(*expected)} (register again to change the schema)"
            )


def _check_weight(weight: float) -> float:
    if not (math.isfinite(weight) and weight >= 0):
        raise InvalidRequest(f"weight must be a finite non-negative number, got {weight}")
    return weight


def _check_round(has_round: bool, value: int) -> int | None:
    if not has_round:
        return None
    if value < 0:
        raise InvalidRequest(f"round must be non-negative, got {value}")
    return value


# ---------------------------------------------------------------- shared memory


class MappedSegment:
    """The trainer's shared-memory segment as the averager maps it: never unlinked here (the
    trainer owns it), and never handed to this process's resource tracker, which would unlink
    it when the averager exits (or fail when trainer and averager share one process)."""

    def __init__(self, name: str):
        self.name = name
        self._shm: SharedMemory | None = None
        self._mmap: mmap.mmap | None = None
        try:
            if sys.version_info >= (3, 13):
                self._shm = SharedMemory(name=name, track=False)  # type: ignore[call-arg]
            elif os.name == "posix":  # what SharedMemory(name) does, less the resource tracker
                import _posixshmem  # type: ignore[import-not-found]

                fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
                try:
                    self._mmap = mmap.mmap(fd, os.fstat(fd).st_size)
                finally:
                    os.close(fd)
            else:  # Windows: no resource tracker involved
                self._shm = SharedMemory(name=name)
        except FileNotFoundError:
            raise InvalidRequest(
                f"no shared memory segment named {name!r} on the averager's host (is the trainer on another "
                f"host or in another IPC namespace? then register without shared memory)"
            ) from None
        except (OSError, ValueError) as e:
            raise InvalidRequest(f"cannot map shared memory segment {name!r}: {e}") from None
        self.buf = self._shm.buf if self._shm is not None else memoryview(self._mmap)  # type: ignore[arg-type]

    @property
    def size(self) -> int:
        return len(self.buf)

    def close(self) -> None:
        """Unmaps the segment once no tensor views it (else it stays mapped until the process exits)."""
        try:
            if self._shm is not None:
                self._shm.close()
            else:
                self.buf.release()
                assert self._mmap is not None
                self._mmap.close()
        except BufferError:
            logger.warning("shared memory segment %s is still in use; leaving it mapped", self.name)


def _release_segment(segment: SharedMemory | MappedSegment | None, *, unlink: bool = False) -> None:
    if segment is None:
        return
    try:
        segment.close()
    except BufferError:  # a tensor still views it: it is unmapped when that tensor is freed or at exit
        logger.warning("shared memory segment %s is still in use; leaving it mapped", segment.name)
    if unlink and isinstance(segment, SharedMemory):
        try:
            segment.unlink()
        except FileNotFoundError:
            pass


def _segment_views(segment: MappedSegment, schema: Schema) -> list[torch.Tensor]:
    """Float32 views into the segment, one per registered tensor, shaped like it."""
    flat = torch.frombuffer(segment.buf, dtype=torch.float32, count=schema.numel)
    return [part.view(shape) for part, (_, shape) in zip(flat.split(schema.numels), schema.tensors)]


# ---------------------------------------------------------------- the averager's side


@dataclass
class Registration:
    """What the trainer registered: the schema and the averager's tensors for it."""

    schema: Schema
    tensors: list[torch.Tensor]  # views into the segment, else meta tensors (shapes only)
    segment: MappedSegment | None = None
    registered_at: float = 0.0


@dataclass(frozen=True)
class RoundResult:
    result: str  # OK, NO_GROUP or FAILED
    group_size: int
    seconds: float
    finished_at: float  # unix time
    error: str = ""
    formed_early: bool = False  # the group was formed ahead of the round (Prepare)
    sent_bytes: int = 0  # all-reduce tensor bytes sent since the previous round's record
    received_bytes: int = 0  # and received


@dataclass(frozen=True)
class Outcome:
    """How one round went, as the averager's reply tells the trainer."""

    result: str  # OK, NO_GROUP or FAILED
    group_size: int  # 0 unless OK
    error: str = ""  # why the round failed
    formed_early: bool = False  # the group was formed ahead (Prepare)
    sent_bytes: int = 0  # all-reduce tensor bytes the averager sent since its previous reply
    received_bytes: int = 0  # and received

    @classmethod
    def of(cls, reply: RoundOutcome) -> Outcome:
        return cls(reply.result, reply.group_size, reply.error, reply.formed_early, reply.sent_bytes,
                   reply.received_bytes)


@dataclass
class Traffic:
    """Tensor bytes of the all-reduce parts and means an averager sent and received so far
    (counted by whoever runs its bulk client and reductions: the averager service)."""

    sent: int = 0
    received: int = 0


class LocalServicer:
    """Serves `LOCAL_SERVICE` for an averager (attached to its public server), its state donor
    and the DHT. One round runs at a time; a new registration waits for the round in flight."""

    def __init__(
        self,
        averager: Averager,
        donor: StateDonor,
        dht: DHTLike,
        *,
        wire: WireSettings,
        state_client: BulkClient,
        state_timeout: float = 60.0,
        on_round: Callable[[RoundResult], None] | None = None,
        on_state: Callable[[], Awaitable[bool]] | None = None,
        traffic: Traffic | None = None,
    ):
        self.averager = averager
        self.donor = donor
        self.dht = dht
        self.wire = wire
        self.state_client = state_client
        self.state_timeout = state_timeout
        self.on_round = on_round
        self.on_state = on_state
        self.traffic = traffic or Traffic()
        self._recorded = Traffic()  # the traffic at the previous round's record
        self.registration: Registration | None = None
        self.last_round: RoundResult | None = None
        self._lock = asyncio.Lock()

    # ---- registration

    async def register(self, request: RegisterRequest, context: CallContext) -> RegisterReply:
        schema = Schema.of_headers(request.tensors, self.wire.max_tensor_bytes)
        segment = None
        if request.shm_name:
            segment = MappedSegment(request.shm_name)
            if segment.size < schema.numel * 4:
                _release_segment(segment)
                raise InvalidRequest(
                    f"shared memory segment {request.shm_name!r} has {segment.size} bytes; the schema's "
                    f"{schema.numel} elements need {schema.numel * 4} (flattened to float32)"
                )
            tensors = _segment_views(segment, schema)
        else:
            tensors = [torch.empty(shape, dtype=torch_dtype(dtype), device="meta") for dtype, shape in schema.tensors]
        try:
            async with self._lock:  # not in the middle of a round
                old, self.registration = self.registration, Registration(schema, tensors, segment, time.time())
                self.averager.tensors = tensors
                self.averager.schema = schema.digest
                self.averager.matchmaker = None  # made anew with the new schema
        except BaseException:  # cancelled while a round ran: the new mapping is not kept
            tensors.clear()
            _release_segment(segment)
            raise
        del tensors
        if old is not None:
            old.tensors.clear()
            _release_segment(old.segment)
        logger.info("registered %d tensors (%d elements, schema %s)%s", len(schema), schema.numel, schema.digest,
                    f" in shared memory {request.shm_name}" if segment is not None else "")
        return RegisterReply(schema=schema.digest, numel=schema.numel, shared_memory=segment is not None,
                             matchmaking_seconds=self.averager.matchmaking_seconds)

    def _registered(self) -> Registration:
        if self.registration is None:
            raise NotRegistered("no tensors are registered: call Register first")
        return self.registration

    # ---- rounds

    async def average(self, requests: AsyncIterator[AverageRequest], context: CallContext) -> AsyncIterator[AverageReply]:
        try:
            registration = self._registered()
            first = await anext(requests, None)
            if first is None or first.WhichOneof("part") != "header":
                raise InvalidRequest("an Average call starts with an AverageHeader (weight), then the tensors' chunks")
            weight = _check_weight(first.header.weight)
            round_index = _check_round(first.header.HasField("round"), first.header.round)
            tensors = await self._receive(requests, registration.schema)
        except RequestError:
            await _drain(requests)
            raise
        async with self._lock:
            if self.registration is not registration:
                raise NotRegistered("the tensors were registered again during this call; send them again")
            self.averager.tensors = tensors  # averaged in place: this call's own buffers
            try:
                result = await self._round(weight, round_index)
            finally:
                self.averager.tensors = registration.tensors
        averaged = result.result == OK and self.averager.settings.mode is not Role.AUX
        yield AverageReply(outcome=self._outcome(result, averaged))
        if averaged:
            for chunk in tensors_to_chunks(tensors, self.wire.chunk_bytes):
                yield AverageReply(chunk=chunk)

    async def average_shared(self, request: AverageSharedRequest, context: CallContext) -> AverageSharedReply:
        registration = self._registered()
        if registration.segment is None:
            raise NotRegistered("the tensors were registered without shared memory: use Average, or register "
                                "again with shm_name")
        weight = _check_weight(request.weight)
        round_index = _check_round(request.HasField("round"), request.round)
        async with self._lock:
            if self.registration is not registration:
                raise NotRegistered("the tensors were registered again during this call; call again")
            result = await self._round(weight, round_index)  # reads and writes the segment
        averaged = result.result == OK and self.averager.settings.mode is not Role.AUX
        return AverageSharedReply(group_size=result.group_size, outcome=self._outcome(result, averaged))

    async def prepare(self, request: PrepareRequest, context: CallContext) -> PrepareReply:
        self._registered()
        if request.round < 0:
            raise InvalidRequest(f"round must be non-negative, got {request.round}")
        return PrepareReply(started=self.averager.prepare(request.round))

    async def _receive(self, requests: AsyncIterator[AverageRequest], schema: Schema) -> list[torch.Tensor]:
        """The tensors that follow the header, each checked against the schema before it is allocated."""
        assembler = ChunkAssembler(self.wire.max_tensor_bytes)
        tensors: list[torch.Tensor] = []
        async for message in requests:
            if message.WhichOneof("part") != "chunk":
                raise InvalidRequest("only tensor chunks may follow the AverageHeader")
            if message.chunk.HasField("header"):
                schema.check(len(tensors), message.chunk.header.dtype, message.chunk.header.shape)
            done = assembler.feed(message.chunk)
            if done is not None:
                tensors.append(tensor_from_payload(*done))
        assembler.close()
        if len(tensors) != len(schema):
            raise InvalidRequest(f"{len(tensors)} tensors sent; the registered schema has {len(schema)}")
        return tensors

    async def _round(self, weight: float, round_index: int | None) -> RoundResult:
        started = time.monotonic()
        try:
            size = await self.averager.step(weight, round=round_index)
        except asyncio.CancelledError:
            self._record(FAILED, 0, started, "cancelled (the trainer hung up or the service is stopping)")
            raise
        except Exception as e:  # noqa: BLE001 - a failed round leaves the tensors as they were
            error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            logger.warning("averaging round failed: %s", error)
            return self._record(FAILED, 0, started, error)
        return self._record(OK if size else NO_GROUP, size or 0, started)

    def _record(self, result: str, size: int, started: float, error: str = "") -> RoundResult:
        sent, received = self.traffic.sent - self._recorded.sent, self.traffic.received - self._recorded.received
        self._recorded = Traffic(self.traffic.sent, self.traffic.received)
        record = RoundResult(result, size, time.monotonic() - started, time.time(), error, self.averager.formed_early,
                             sent, received)
        self.last_round = record
        if self.on_round is not None:
            self.on_round(record)
        return record

    @staticmethod
    def _outcome(result: RoundResult, averaged: bool) -> RoundOutcome:
        return RoundOutcome(result=result.result, group_size=result.group_size, error=result.error, averaged=averaged,
                            formed_early=result.formed_early, sent_bytes=result.sent_bytes,
                            received_bytes=result.received_bytes)

    # ---- state

    async def publish_state(self, requests: AsyncIterator[PublishStateRequest], context: CallContext) -> PublishStateReply:
        try:
            metadata, tensors = await self._receive_state(requests)
        except RequestError:
            await _drain(requests)
            raise
        state = State(metadata, tensors)
        self.donor.update(state)
        announced = await self.on_state() if self.on_state is not None else False
        logger.info("state of epoch %d published (%d tensors)", state.epoch, len(tensors))
        return PublishStateReply(epoch=state.epoch, tensors=len(tensors), announced=announced)

    async def _receive_state(self, requests: AsyncIterator[PublishStateRequest]) -> tuple[dict[str, Any], list[torch.Tensor]]:
        first = await anext(requests, None)
        if first is None or first.WhichOneof("part") != "metadata":
            raise InvalidRequest("a PublishState call starts with the metadata (msgpack), then the tensors' chunks")
        metadata = _metadata_of(first.metadata)
        assembler = ChunkAssembler(self.wire.max_tensor_bytes)
        tensors: list[torch.Tensor] = []
        async for message in requests:
            if message.WhichOneof("part") != "chunk":
                raise InvalidRequest("only tensor chunks may follow the state's metadata")
            if message.chunk.HasField("header") and len(tensors) >= MAX_TENSORS_PER_REQUEST:
                raise InvalidRequest(f"a state holds at most {MAX_TENSORS_PER_REQUEST} tensors")
            done = assembler.feed(message.chunk)
            if done is not None:
                tensors.append(tensor_from_payload(*done))
        assembler.close()
        return metadata, tensors

    async def load_state(self, request: LoadStateRequest, context: CallContext) -> AsyncIterator[LoadStateReply]:
        timeout = request.timeout or self.state_timeout
        if not (math.isfinite(timeout) and timeout > 0):
            raise InvalidRequest(f"timeout must be a positive number of seconds, got {request.timeout}")
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = max(0.1, min(timeout, remaining - 1.0))  # leave time to stream the answer
        prefix = self.averager.settings.prefix
        try:
            state = await download_state(self.dht, prefix, self.state_client, timeout=timeout)
        except StateTransferError as e:
            raise StateUnavailable(str(e)) from None
        except WireError as e:
            raise StateUnavailable(f"could not look up the state donors of run {prefix!r}: {e}") from None
        yield LoadStateReply(metadata=msgpack.packb(state.metadata, use_bin_type=True))
        for chunk in tensors_to_chunks(state.tensors, self.wire.chunk_bytes):
            yield LoadStateReply(chunk=chunk)

    # ---- shutdown

    async def close(self) -> None:
        """Unmaps the trainer's segment (call once no round can run)."""
        registration, self.registration = self.registration, None
        if registration is not None:
            self.averager.tensors = []
            registration.tensors.clear()
            _release_segment(registration.segment)


async def _drain(requests: AsyncIterator[Any]) -> None:
    """Reads, and drops, what the trainer still sends before its call is refused: a status sent
    while the client is still writing can reach it as INTERNAL "Internal error from Core" instead
    of the status sent (grpc/grpc#36066), so refusals wait for the end of the request stream."""
    try:
        async for _ in requests:
            pass
    except RequestError:  # a malformed message: the refusal already says what is wrong
        pass


def _metadata_of(raw: bytes) -> dict[str, Any]:
    try:
        metadata = msgpack.unpackb(raw, raw=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise InvalidRequest(f"the state's metadata is not msgpack: {e}") from None
    if not isinstance(metadata, dict):
        raise InvalidRequest(f"the state's metadata must be a mapping, got {type(metadata).__name__}")
    epoch = metadata.get("epoch", 0)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise InvalidRequest(f"the state's metadata 'epoch' must be a non-negative integer, got {epoch!r}")
    return metadata


# ---------------------------------------------------------------- the trainer's side


class AveragerClient:
    """The trainer's handle on its participant's averager service (its local API address).

        client = AveragerClient("127.0.0.1:5200")
        await client.register(params, use_shared_memory=True)
        size = await client.average(params, weight=batch_size)   # None: no group (params unchanged)
    """

    def __init__(self, endpoint: Endpoint | str, pool: ChannelPool | None = None, *, timeout: float = 30.0,
                 round_timeout: float = 300.0):
        self.endpoint = Endpoint.parse(endpoint) if isinstance(endpoint, str) else endpoint
        self._owns_pool = pool is None
        self.pool = pool or ChannelPool()
        self.round_timeout = round_timeout
        self._rpc = RpcClient(self.pool, LOCAL_SERVICE, self.endpoint, timeout=timeout)
        self.schema: Schema | None = None
        self.matchmaking_seconds = 0.0  # how long the averager takes to form a group (from register())
        self.last_outcome: Outcome | None = None  # of the latest average()
        self.averaged_bytes = 0  # all-reduce tensor bytes sent and received, as the rounds' replies report them
        self._segment: SharedMemory | None = None
        self._flat: torch.Tensor | None = None  # float32 view of the whole segment

    @property
    def shared_memory_name(self) -> str | None:
        return self._segment.name if self._segment is not None else None

    async def register(self, tensors: Sequence[torch.Tensor], use_shared_memory: bool = False) -> str:
        """Declares the tensors to average (their dtypes and shapes); returns the schema digest.
        With shared memory, rounds go through a segment this client creates (same host only)."""
        schema = Schema.of_tensors(tensors)
        segment = None
        if use_shared_memory:
            segment = SharedMemory(name=f"apiary_{uuid.uuid4().hex[:16]}", create=True, size=max(4 * schema.numel, 1))
        try:
            reply = await self._rpc.call("Register", RegisterRequest(tensors=schema.headers(),
                                                                     shm_name=segment.name if segment else ""))
        except BaseException:
            _release_segment(segment, unlink=True)
            raise
        self._release()
        self.schema = schema
        self.matchmaking_seconds = reply.matchmaking_seconds
        if segment is not None:
            self._segment = segment
            self._flat = torch.frombuffer(segment.buf, dtype=torch.float32, count=schema.numel)
        return reply.schema

    async def average(self, tensors: Sequence[torch.Tensor], weight: float = 1.0, *, round: int | None = None,
                      timeout: float | None = None) -> int | None:
        """One round: averages `tensors` in place with the swarm; returns the group size, or None
        if no group formed or the round failed (tensors unchanged; see `last_outcome`).
        Raises RequestRejected if the tensors do not match the registered schema."""
        if self.schema is None:
            raise RuntimeError("register() the tensors first")
        timeout = timeout or self.round_timeout
        if self._flat is not None:
            outcome = await self._average_shared(tensors, weight, round, timeout)
        else:
            outcome = await self._average_streamed(tensors, weight, round, timeout)
        self.last_outcome = Outcome.of(outcome)
        self.averaged_bytes += outcome.sent_bytes + outcome.received_bytes
        if outcome.result == FAILED:
            logger.warning("averaging round failed: %s", outcome.error)
        return outcome.group_size if outcome.result == OK else None

    async def prepare(self, round: int) -> bool:
        """Asks the averager to form the group of round `round` now (call it about
        `matchmaking_seconds` before that round's average()); False if it is busy forming one."""
        if self.schema is None:
            raise RuntimeError("register() the tensors first")
        return (await self._rpc.call("Prepare", PrepareRequest(round=round))).started

    async def _average_shared(self, tensors: Sequence[torch.Tensor], weight: float, round: int | None,
                              timeout: float) -> RoundOutcome:
        assert self.schema is not None and self._flat is not None
        self._check(tensors)
        offset = 0
        with torch.no_grad():
            for tensor in tensors:  # straight into the segment, from any device, cast to float32
                self._flat[offset : offset + tensor.numel()].copy_(tensor.detach().reshape(-1))
                offset += tensor.numel()
        request = AverageSharedRequest(weight=weight, round=round) if round is not None else AverageSharedRequest(weight=weight)
        reply = await self._rpc.call("AverageShared", request, timeout=timeout)
        if reply.outcome.averaged:
            unflatten_into(self._flat, tensors)
        return reply.outcome

    async def _average_streamed(self, tensors: Sequence[torch.Tensor], weight: float, round: int | None,
                                timeout: float) -> RoundOutcome:
        header = AverageHeader(weight=weight, round=round) if round is not None else AverageHeader(weight=weight)
        chunk_bytes = self.pool.settings.chunk_bytes

        async def requests() -> AsyncIterator[AverageRequest]:
            yield AverageRequest(header=header)
            for chunk in tensors_to_chunks(tensors, chunk_bytes):
                yield AverageRequest(chunk=chunk)

        replies = self._rpc.stream("Average", requests(), timeout=timeout)
        try:
            first = await anext(replies, None)
            if first is None or first.WhichOneof("part") != "outcome":
                raise RemoteFailure(f"Average on {self.endpoint} answered without an outcome", peer=str(self.endpoint))
            outcome = first.outcome
            if outcome.averaged:
                averaged = await _receive_chunks(replies, self.pool.settings.max_tensor_bytes, str(self.endpoint))
                if [tuple(t.shape) for t in averaged] != [tuple(t.shape) for t in tensors]:
                    raise RemoteFailure(f"Average on {self.endpoint} sent back tensors of other shapes",
                                        peer=str(self.endpoint))
                with torch.no_grad():
                    for tensor, mean in zip(tensors, averaged):
                        tensor.copy_(mean)
        finally:
            await replies.aclose()
        return outcome

    def _check(self, tensors: Sequence[torch.Tensor]) -> None:
        """Raises RequestRejected unless `tensors` match the registered schema (shared-memory path)."""
        assert self.schema is not None
        try:
            for index, tensor in enumerate(tensors):
                self.schema.check(index, dtype_name(tensor.dtype), tuple(tensor.shape))
            if len(tensors) != len(self.schema):
                raise InvalidRequest(f"{len(tensors)} tensors given; the registered schema has {len(self.schema)}")
        except InvalidRequest as e:
            raise RequestRejected(f"AverageShared: {e}", peer=str(self.endpoint),
                                  code=grpc.StatusCode.INVALID_ARGUMENT) from None

    async def publish_state(self, metadata: dict[str, Any], tensors: Sequence[torch.Tensor]) -> PublishStateReply:
        """Hands the averager the state to give newcomers (metadata: a msgpack-able mapping with
        an integer "epoch"); the averager serves it even after this trainer is gone."""
        packed = msgpack.packb(metadata, use_bin_type=True)
        chunk_bytes = self.pool.settings.chunk_bytes

        async def requests() -> AsyncIterator[PublishStateRequest]:
            yield PublishStateRequest(metadata=packed)
            for chunk in tensors_to_chunks(tensors, chunk_bytes):
                yield PublishStateRequest(chunk=chunk)

        return await self._rpc.call("PublishState", requests(), timeout=self.round_timeout)

    async def load_state(self, timeout: float = 60.0) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """The swarm's newest state (metadata, tensors), downloaded by the averager from a donor.
        Raises NotFound if no donor gave one within `timeout` seconds."""
        replies = self._rpc.stream("LoadState", LoadStateRequest(timeout=timeout), timeout=timeout + 30)
        try:
            first = await anext(replies, None)
            if first is None or first.WhichOneof("part") != "metadata":
                raise RemoteFailure(f"LoadState on {self.endpoint} answered without metadata", peer=str(self.endpoint))
            metadata = msgpack.unpackb(first.metadata, raw=False)
            tensors = await _receive_chunks(replies, self.pool.settings.max_tensor_bytes, str(self.endpoint))
        finally:
            await replies.aclose()
        return metadata, tensors

    def _release(self) -> None:
        self._flat = None
        segment, self._segment = self._segment, None
        _release_segment(segment, unlink=True)

    async def close(self) -> None:
        """Unlinks this client's segment (the averager keeps its mapping until the trainer
        registers again or the service stops) and closes the channels this client opened."""
        self._release()
        self.schema = None
        if self._owns_pool:
            await self.pool.close()

    async def __aenter__(self) -> AveragerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _receive_chunks(replies: AsyncIterator[Any], max_tensor_bytes: int, peer: str) -> list[torch.Tensor]:
    """The tensors of the chunks that follow a reply's first message."""
    assembler = ChunkAssembler(max_tensor_bytes)
    tensors = []
    try:
        async for reply in replies:
            if reply.WhichOneof("part") != "chunk":
                raise InvalidRequest("a second header message arrived among the tensor chunks")
            chunk: TensorChunk = reply.chunk
            done = assembler.feed(chunk)
            if done is not None:
                tensors.append(tensor_from_payload(*done))
        assembler.close()
    except (InvalidRequest, PayloadTooLarge) as e:  # what the chunk assembler refuses
        raise RemoteFailure(f"{peer} sent a malformed tensor stream: {e}", peer=peer) from None
    return tensors

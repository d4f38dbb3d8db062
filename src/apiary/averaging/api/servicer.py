"""The averager's side of the local API (`LOCAL_SERVICE`): rounds, registration and state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import msgpack
import torch

from apiary.averaging.api.shared_memory import float32_views, map_segment, release_segment
from apiary.averaging.api.spec import FAILED, OK, Schema, tensor_chunks
from apiary.averaging.averager import Averager, RoundResult
from apiary.averaging.spans import Role
from apiary.averaging.protos.local_pb2 import (
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
from apiary.dht.interface import DHTLike
from apiary.wire import CallContext, InvalidRequest, NotFoundHere, RequestError, WireError, WireSettings, WrongState
from apiary.wire.bulk import BulkClient
from apiary.wire.framing import MAX_TENSORS_PER_REQUEST
from apiary.wire.protos.wire_pb2 import TensorHeader
from apiary.wire.tensors import receive_tensors, tensors_to_chunks, torch_dtype

logger = logging.getLogger(__name__)


class NotRegistered(WrongState):
    """The call needs a registration (or a shared-memory one) first: FAILED_PRECONDITION."""


class StateUnavailable(NotFoundHere):
    """No donor gave a state in time: NOT_FOUND."""


@dataclass
class Registration:
    """What the trainer registered: the schema and the averager's tensors for it."""

    schema: Schema
    tensors: list[torch.Tensor]  # views into the segment, else meta tensors (shapes only)
    segment: SharedMemory | None = None
    registered_at: float = 0.0


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
        on_state: Callable[[], Awaitable[bool]] | None = None,
    ):
        self.averager = averager
        self.donor = donor
        self.dht = dht
        self.wire = wire
        self.state_client = state_client
        self.state_timeout = state_timeout
        self.on_state = on_state
        self.registration: Registration | None = None
        self._lock = asyncio.Lock()

    # ---- registration

    async def register(self, request: RegisterRequest, context: CallContext) -> RegisterReply:
        schema = Schema.of_headers(request.tensors, self.wire.max_tensor_bytes)
        segment = None
        if request.shm_name:
            segment = map_segment(request.shm_name)
            if segment.size < schema.numel * 4:
                release_segment(segment)
                raise InvalidRequest(
                    f"shared memory segment {request.shm_name!r} has {segment.size} bytes; the schema's "
                    f"{schema.numel} elements need {schema.numel * 4} (flattened to float32)"
                )
            tensors = float32_views(segment, schema)
        else:
            tensors = [torch.empty(shape, dtype=torch_dtype(dtype), device="meta") for dtype, shape in schema.tensors]
        try:
            async with self._lock:  # not in the middle of a round
                old, self.registration = self.registration, Registration(schema, tensors, segment, time.time())
                self.averager.register(tensors)
        except BaseException:  # cancelled while a round ran: the new mapping is not kept
            tensors.clear()
            release_segment(segment)
            raise
        del tensors
        if old is not None:
            old.tensors.clear()
            release_segment(old.segment)
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
            result = await self._round(weight, round_index, tensors)  # averaged in place: this call's own buffers
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

        def check(index: int, header: TensorHeader) -> None:
            schema.check(index, header.dtype, header.shape)

        chunks = tensor_chunks(requests, "the AverageHeader", check)
        tensors = [tensor async for tensor in receive_tensors(chunks, self.wire.max_tensor_bytes)]
        if len(tensors) != len(schema):
            raise InvalidRequest(f"{len(tensors)} tensors sent; the registered schema has {len(schema)}")
        return tensors

    async def _round(self, weight: float, round_index: int | None,
                     tensors: list[torch.Tensor] | None = None) -> RoundResult:
        with contextlib.suppress(Exception):  # a failed round leaves the tensors as they were; its result says why
            await self.averager.step(weight, round=round_index, tensors=tensors)
        result = self.averager.last_round
        assert result is not None  # every step reports its result
        if result.result == FAILED:
            logger.warning("averaging round failed: %s", result.error, extra={"event": "round_failed"})
        return result

    @staticmethod
    def _outcome(result: RoundResult, averaged: bool) -> RoundOutcome:
        return RoundOutcome(result=result.result, group_size=result.group_size, error=result.error, averaged=averaged,
                            formed_early=result.formed_early, sent_bytes=result.sent_bytes,
                            received_bytes=result.received_bytes, members=result.members)

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

        def check(index: int, header: TensorHeader) -> None:
            if index >= MAX_TENSORS_PER_REQUEST:
                raise InvalidRequest(f"a state holds at most {MAX_TENSORS_PER_REQUEST} tensors")

        chunks = tensor_chunks(requests, "the state's metadata", check)
        return metadata, [tensor async for tensor in receive_tensors(chunks, self.wire.max_tensor_bytes)]

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
            self.averager.register([])
            registration.tensors.clear()
            release_segment(registration.segment)


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

"""The trainer's side of the local API: `AveragerClient` (loads neither the servicer nor the
`Averager`, so a trainer imports only what it calls)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import grpc
import msgpack
import torch

from apiary.averaging.api.shared_memory import create_segment, release_segment
from apiary.averaging.api.spec import FAILED, LOCAL_SERVICE, OK, Schema, tensor_chunks
from apiary.averaging.flat import unflatten_into
from apiary.averaging.protos.local_pb2 import (
    AverageHeader,
    AverageRequest,
    AverageSharedRequest,
    LoadStateRequest,
    PrepareRequest,
    PublishStateReply,
    PublishStateRequest,
    RegisterRequest,
    RoundOutcome,
)
from apiary.wire import ChannelPool, Endpoint, InvalidRequest, PayloadTooLarge, RemoteFailure, RequestRejected, RpcClient
from apiary.wire.tensors import dtype_name, receive_tensors, tensors_to_chunks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """How one round went, as the averager's reply tells the trainer."""

    result: str  # OK, NO_GROUP or FAILED
    group_size: int  # 0 unless OK
    error: str = ""  # why the round failed
    formed_early: bool = False  # the group was formed ahead (Prepare)
    sent_bytes: int = 0  # all-reduce tensor bytes the averager sent since its previous reply
    received_bytes: int = 0  # and received
    members: tuple[str, ...] = ()  # the group's peer ids, sorted (OK; none from an averager older than the field)

    @classmethod
    def of(cls, reply: RoundOutcome) -> Outcome:
        return cls(reply.result, reply.group_size, reply.error, reply.formed_early, reply.sent_bytes,
                   reply.received_bytes, tuple(reply.members))


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
        segment = create_segment(schema.numel) if use_shared_memory else None
        try:
            reply = await self._rpc.call("Register", RegisterRequest(tensors=schema.headers(),
                                                                     shm_name=segment.name if segment else ""))
        except BaseException:
            release_segment(segment, unlink=True)
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
                averaged = await self._receive(replies, "the round's outcome")
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
            tensors = await self._receive(replies, "the state's metadata")
        finally:
            await replies.aclose()
        return metadata, tensors

    async def _receive(self, replies: AsyncIterator[Any], after: str) -> list[torch.Tensor]:
        """The tensors of the chunks that follow a reply's first message."""
        try:
            chunks = tensor_chunks(replies, after)
            return [tensor async for tensor in receive_tensors(chunks, self.pool.settings.max_tensor_bytes)]
        except (InvalidRequest, PayloadTooLarge) as e:  # what receive_tensors refuses
            raise RemoteFailure(f"{self.endpoint} sent a malformed tensor stream: {e}", peer=str(self.endpoint)) from None

    def _release(self) -> None:
        self._flat = None
        segment, self._segment = self._segment, None
        release_segment(segment, unlink=True)

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

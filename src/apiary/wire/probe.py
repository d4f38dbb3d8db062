"""The probe service, hosted by every apiary gRPC server.

`Ping` tells who answers at an address (peer id, announced address, version, clock) and the
caller where its call came from (`apiary.wire.observed`).
`Echo` returns every tensor it receives and `Sink` returns a digest of each: both check the
chunk stream's framing and limits, so they measure links and prove tensors arrive intact.
The bulk route `SINK_ROUTE` does what `Sink` does over the bulk transport.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator

import apiary
from apiary.wire.address import Endpoint
from apiary.wire.bulk import BulkAnswer, BulkCall
from apiary.wire.chunks import ChunkAssembler, split_payload
from apiary.wire.identity import Identity
from apiary.wire.limits import ByteBudget, PeerBudget, peer_key
from apiary.wire.observed import observed_address
from apiary.wire.protos.wire_pb2 import PingReply, PingRequest, SinkReply, SinkRequest, TensorChunk, TensorDigest, TensorHeader
from apiary.wire.rpc import CallContext, Method, ServiceSpec, decode
from apiary.wire.settings import WireSettings

PROBE = ServiceSpec(
    "apiary.wire.Probe",
    (
        Method("Ping", PingRequest, PingReply),
        Method("Echo", TensorChunk, TensorChunk, client_streaming=True, server_streaming=True),
        Method("Sink", TensorChunk, SinkReply, client_streaming=True),
    ),
)

SINK_ROUTE = "apiary.wire.Probe/Sink"


def _digest(header: TensorHeader, payload: bytearray | memoryview) -> TensorDigest:
    return TensorDigest(header=header, sha256=hashlib.sha256(payload).digest())


class ProbeService:
    """Answers `PROBE` calls for one peer."""

    def __init__(self, identity: Identity, announced: Endpoint, announced_bulk: Endpoint | None, settings: WireSettings,
                 budget: ByteBudget | None = None):
        self.identity = identity
        self.budget = budget  # the server's bytes in flight, shared by all streams, each peer within its share
        self.announced = announced
        self.announced_bulk = announced_bulk
        self.settings = settings

    async def ping(self, request: PingRequest, context: CallContext) -> PingReply:
        return PingReply(
            peer_id=self.identity.peer_id,
            announced_address=f"{self.identity.peer_id}@{self.announced}",
            version=apiary.__version__,
            server_time=time.time(),
            bulk_address=str(self.announced_bulk or ""),
            observed_address=observed_address(context.peer),
        )

    def _budget_of(self, context: CallContext) -> PeerBudget | None:
        return self.budget.for_peer(peer_key(context.peer)) if self.budget is not None else None

    async def echo(self, chunks: AsyncIterator[TensorChunk], context: CallContext) -> AsyncIterator[TensorChunk]:
        with ChunkAssembler(self.settings.max_tensor_bytes, self._budget_of(context)) as assembler:
            async for chunk in chunks:
                done = assembler.feed(chunk)
                if done is not None:
                    header, payload = done
                    for reply in split_payload(header, memoryview(payload), self.settings.chunk_bytes):
                        yield reply
            assembler.close()

    async def sink(self, chunks: AsyncIterator[TensorChunk], context: CallContext) -> SinkReply:
        reply = SinkReply()
        with ChunkAssembler(self.settings.max_tensor_bytes, self._budget_of(context)) as assembler:
            async for chunk in chunks:
                reply.total_bytes += len(chunk.data)
                done = assembler.feed(chunk)
                if done is not None:
                    reply.tensors.append(_digest(*done))
            assembler.close()
        return reply

    async def bulk_sink(self, call: BulkCall) -> BulkAnswer:
        request = decode(SinkRequest, call.body)
        if request.digest:
            reply = SinkReply(tensors=[_digest(header, payload) for header, payload in call.tensors])
        else:
            reply = SinkReply(tensors=[TensorDigest(header=header) for header, _ in call.tensors])
        reply.total_bytes = sum(len(payload) for _, payload in call.tensors)
        return BulkAnswer(body=reply.SerializeToString())

"""A member's side of one all-reduce round (`run_allreduce`).

It sends span j of its flattened tensors (encoded by its codec) to member j, the span's reducer,
and writes the mean that reducer answers into the result; where a reducer fails it keeps its own
values for that span. The span it reduces itself, if any, goes through its own `AllReduceService`
(`apiary.averaging.allreduce`, which also describes the protocol). With verification it commits
to each part it sends and audits the spans others reduced for it before the round ends.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import torch

from apiary.averaging.allreduce import REDUCE_ROUTE, AllReduceService, GroupRound, OwnParts, decode_part
from apiary.averaging.compression import Codec
from apiary.averaging.protos.averaging_pb2 import ReduceReply, ReduceRequest
from apiary.averaging.spans import Member
from apiary.averaging.verification import SignedPart, Verifier, commit
from apiary.wire import AddressError, Endpoint, InvalidRequest, WireError
from apiary.wire.bulk import BulkClient
from apiary.wire.rpc import decode
from apiary.wire.tensors import tensor_payload

logger = logging.getLogger(__name__)


async def run_allreduce(
    round_: GroupRound,
    flat: torch.Tensor,
    weight: float,
    *,
    service: AllReduceService,
    client: BulkClient,
    codec: Codec,
    deadline: float,
    out: torch.Tensor | None = None,
    verifier: Verifier | None = None,
) -> torch.Tensor:
    """This member's part of one round. `flat` is the member's flattened float32 tensors (empty
    for auxiliary members); returns the averaged vector (local values kept where a reducer
    failed), written into `out` when given (a buffer reused across rounds saves fresh memory).
    With `verifier` (and `round_.verify`), parts are committed to and the spans others reduced
    are audited before the round ends. Runs no longer than `deadline` seconds (raises
    asyncio.TimeoutError)."""
    result = out if out is not None and out.shape == flat.shape else torch.empty_like(flat)
    exchange = _Exchange(round_, weight, service, client, codec, result, verifier if round_.verify else None)
    async with asyncio.timeout(deadline):
        return await _allreduce(exchange, flat)


@dataclass
class _Exchange:
    """One member's round: where results go and, with verification, what it committed to."""

    round_: GroupRound
    weight: float
    service: AllReduceService
    client: BulkClient
    codec: Codec
    result: torch.Tensor
    verifier: Verifier | None
    answered: dict[int, str] = field(default_factory=dict)  # span -> codec of its reducer's reply
    shunned: set[int] = field(default_factory=set)  # spans of reducers we banned: recomputed from the parts
    commitments: dict[int, SignedPart] = field(default_factory=dict)  # our commitments, by span
    own: OwnParts | None = None  # with verification: our parts as decoded, kept for the Part route

    async def committed(self, index: int, part: torch.Tensor) -> SignedPart | None:
        """Our signed commitment to `part` (span `index`), kept to serve and to audit against."""
        if self.verifier is None or self.own is None:
            return None
        start, end = self.round_.spans[index]
        kept = self.own.parts[index] = self.own.storage[start:end].copy_(part)
        signed = await asyncio.to_thread(commit, self.verifier.identity, self.round_.group_id, index, self.weight, kept)
        self.commitments[index] = signed
        return signed


async def _allreduce(exchange: _Exchange, flat: torch.Tensor) -> torch.Tensor:
    """Fills every span of `result`: with the mean, or with local values where its reducer failed."""
    round_, service = exchange.round_, exchange.service
    me = round_.me
    if me.reduces:
        service.open(round_)
    if exchange.verifier is not None and me.sends:
        exchange.own = OwnParts(exchange.weight, service.buffers.take(round_.total))
        service.keep_own_parts(round_.group_id, exchange.own)
    try:
        tasks = []
        if me.sends:
            for index, member in enumerate(round_.members):
                start, end = round_.spans[index]
                if end > start:
                    tasks.append(_exchange(exchange, index, member, flat[start:end]))
        if me.reduces:
            tasks.append(service.local_result(round_.group_id))  # stay until our span is served
        await asyncio.gather(*tasks)
        if exchange.verifier is not None:
            await exchange.verifier.audit(round_, exchange.result, exchange.weight, exchange.answered,
                                          exchange.commitments, exchange.own.parts if exchange.own else {},
                                          exchange.client, exchange.shunned)
    finally:
        if me.reduces:
            service.close(round_.group_id)
    return exchange.result


async def _exchange(exchange: _Exchange, index: int, member: Member, part: torch.Tensor) -> None:
    """Sends one span to its reducer and writes the mean into `result` (keeps local values on failure)."""
    round_, service, client, codec, weight = exchange.round_, exchange.service, exchange.client, exchange.codec, exchange.weight
    start, end = round_.spans[index]
    me = round_.me
    if index == round_.own_index:
        service.contribute_local(round_.group_id, me.peer_id, part, weight, await exchange.committed(index, part))
        exchange.result[start:end] = await service.local_result(round_.group_id)
        return
    encoded = codec.encode(part)
    signed = await exchange.committed(index, codec.decode(encoded, end - start)) if exchange.verifier else None
    target = exchange.result[start:end]
    if exchange.verifier is not None and member.peer_id in exchange.verifier.banned:
        target.copy_(part)  # a group led by a peer that has not banned it: we neither send to it nor trust it
        exchange.shunned.add(index)
        return
    request = ReduceRequest(group_id=round_.group_id, sender=me.peer_id, span=index, weight=weight,
                            codec=codec.name, numel=end - start, commitment=signed.commitment if signed else b"",
                            signature=signed.signature if signed else b"")
    try:
        body, tensors = await client.call(
            Endpoint.parse(member.bulk_address), REDUCE_ROUTE, body=request.SerializeToString(),
            tensors=[tensor_payload(t) for t in encoded], timeout=round_.sender_timeout * 2,
            reply_into=[memoryview(target.numpy())],  # an uncompressed mean lands in place
            peer_id=member.peer_id,
        )
        reply = decode(ReduceReply, body)
        _, mean = decode_part(reply.codec, tensors, end - start, f"mean from reducer {member.peer_id[:8]}")
        if mean.data_ptr() != target.data_ptr():
            target.copy_(mean)
        exchange.answered[index] = reply.codec
    except (AddressError, WireError, InvalidRequest) as e:  # announced unreachable, failed, or answered garbage
        logger.warning("reducer %s of span %d failed, keeping local values: %s", member.peer_id[:8], index, e)
        target.copy_(part)

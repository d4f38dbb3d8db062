"""Butterfly all-reduce within one group, over the bulk transport.

The flattened tensors are cut into one span per member (`spans.spans`). Every sender
sends span j (encoded by its codec) to member j, the span's reducer, in one bulk call; the
reducer accumulates the weighted sum of the parts that arrive, and once every expected sender
has contributed — or `sender_timeout` has passed — answers every waiting call with the
weighted mean. With a robust aggregator (`aggregation`: CenteredClip or a trimmed mean) the
reducer keeps every part instead and combines them when the span is complete. So:
- a sender that stalls past the timeout is left out of that span's mean;
- a reducer that fails (its call errors or times out) makes the senders keep their local
  values for its span;
- the whole round is bounded by its deadline, and results are written to the caller's
  tensors only when the round ends, so a cancelled round leaves them as they were.

With a `Verifier` (`verification`), every part carries its sender's signed commitment, reducers
refuse parts that do not match theirs and keep their recent rounds' parts to answer audits
(`Audit` route), members keep their own parts to serve (`Part` route), and each member audits
the spans others reduced for it before the round ends.

Here: the round (`GroupRound`) and the reducers' side (`AllReduceService`, the `Reduce`, `Audit`
and `Part` routes); a member's side of a round, `run_allreduce`, is `apiary.averaging.exchange`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from apiary.averaging.aggregation import Aggregator
from apiary.averaging.compression import Codec, codec_by_name
from apiary.averaging.protos.averaging_pb2 import AuditRequest, PartRequest, ReduceReply, ReduceRequest
from apiary.averaging.spans import Member, shares, spans
from apiary.averaging.verification import (
    SignedPart, audit_answer, check_part, checked_blocks, block_count, part_answer,
)
from apiary.wire import InvalidRequest, NotFoundHere, WrongState
from apiary.wire.bulk import BulkAnswer, BulkCall
from apiary.wire.protos.wire_pb2 import TensorHeader
from apiary.wire.rpc import decode
from apiary.wire.tensors import tensor_from_payload, tensor_payload

logger = logging.getLogger(__name__)

REDUCE_ROUTE = "apiary.averaging/Reduce"
_REMEMBERED_ROUNDS = 1024
_AUDITED_ROUNDS = 2  # recent rounds whose parts are kept for audits (with verification)
_SPARE_BUFFERS = 4  # buffers of rounds gone by, kept for the next rounds


class _Buffers:
    """Float32 buffers of rounds gone by, handed to later rounds that need the same shape
    (touching fresh memory costs more than the copies that fill it)."""

    def __init__(self) -> None:
        self._spare: list[torch.Tensor] = []

    def take(self, *shape: int) -> torch.Tensor:
        for index, buffer in enumerate(self._spare):
            if tuple(buffer.shape) == shape:
                return self._spare.pop(index)
        return torch.empty(*shape, dtype=torch.float32)

    def give(self, buffer: torch.Tensor) -> None:
        self._spare.append(buffer)
        del self._spare[:-_SPARE_BUFFERS]


@dataclass
class GroupRound:
    """One all-reduce round of one group, as a member sees it."""

    group_id: str
    members: list[Member]
    own_index: int
    total: int  # elements in the flattened tensors
    sender_timeout: float
    aggregator: Aggregator = Aggregator()  # how this member, as a reducer, combines its span's parts
    verify: bool = False  # parts carry signed commitments, reductions are audited
    spans: list[tuple[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.spans = spans(self.total, shares(self.members))

    @property
    def me(self) -> Member:
        return self.members[self.own_index]


class _SpanReduction:
    """The reducer's side of one span: accumulates weighted parts (or, for a robust aggregator,
    keeps them all), then publishes their combination."""

    def __init__(self, round_: GroupRound, numel: int, buffers: _Buffers | None = None):
        self.numel = numel
        self.group_id, self.span = round_.group_id, round_.own_index
        self.expected = {m.peer_id for m in round_.members if m.sends}
        self.aggregator = round_.aggregator
        self.verify = round_.verify
        self.signed: dict[str, SignedPart] = {}  # with verification: each contributor's commitment
        self.sum = torch.empty(numel, dtype=torch.float32)  # written whole by the first part (or at the end)
        if self.aggregator.robust or self.verify:  # one row per sender; parts arrive in a reused buffer: copied
            self._rows = {peer: row for row, peer in enumerate(sorted(self.expected))}
            self._parts = (buffers or _Buffers()).take(len(self._rows), numel)
            self._weights = torch.zeros(len(self._rows), dtype=torch.float32)
        self.weight = 0.0
        self.contributors: set[str] = set()
        self.done = asyncio.Event()
        self.mean: torch.Tensor | None = None
        self._encoded: dict[str, list[torch.Tensor]] = {}
        self.deadline = time.monotonic() + round_.sender_timeout

    def add(self, sender: str, part: torch.Tensor, weight: float, signed: SignedPart | None = None) -> None:
        """Takes `sender`'s part; with verification, `signed` is its commitment, checked against the
        part (`verification.check_part`)."""
        self.admissible(sender, part, weight)
        if self.verify:
            if signed is None:
                raise InvalidRequest(f"part from {sender[:8]} has no commitment (this round is verified)")
            self.signed[sender] = signed
        if self.aggregator.robust or self.verify:
            row = self._rows[sender]
            self._parts[row].copy_(part)
            self._weights[row] = weight
        if not self.aggregator.robust:
            if self.contributors:
                self.sum.add_(part, alpha=weight)
            else:
                torch.mul(part, weight, out=self.sum)
        self.weight += weight
        self.contributors.add(sender)
        if self.contributors == self.expected:
            self.finish()

    def admissible(self, sender: str, part: torch.Tensor, weight: float) -> None:
        """Raises InvalidRequest naming why `sender`'s part cannot be taken now."""
        if self.done.is_set():
            raise WrongState(f"part from {sender[:8]} arrived after the span was reduced (sender timeout)")
        if sender not in self.expected:
            raise InvalidRequest(f"peer {sender[:8]} is not a sender of this group")
        if sender in self.contributors:
            raise InvalidRequest(f"peer {sender[:8]} already sent this span")
        if part.numel() != self.numel:
            raise InvalidRequest(f"part has {part.numel()} elements, the span has {self.numel}")
        if not weight >= 0:
            raise InvalidRequest(f"weight {weight} must be a non-negative number")
        if self.aggregator.robust and not bool(torch.isfinite(part).all()):
            raise InvalidRequest(f"part from {sender[:8]} has non-finite values")

    def finish(self) -> None:
        if not self.done.is_set():
            if not self.contributors:
                self.sum.zero_()
            elif self.aggregator.robust:
                rows = torch.tensor(sorted(self._rows[peer] for peer in self.contributors))
                self.sum.copy_(self.aggregator.combine(self._parts[rows], self._weights[rows]))
            elif self.weight > 0:
                self.sum.div_(self.weight)
            self.mean = self.sum  # in place: no part is added after this
            self.done.set()

    def encoded_mean(self, codec: Codec) -> list[torch.Tensor]:
        """The mean encoded by `codec`, encoded once however many senders ask."""
        assert self.mean is not None
        if codec.name not in self._encoded:
            self._encoded[codec.name] = codec.encode(self.mean)
        return self._encoded[codec.name]

    def audit(self, request: AuditRequest) -> BulkAnswer:
        """Every contributor's signed commitment, proofs and values in the blocks asked for."""
        if not self.verify:
            raise WrongState(f"all-reduce round {self.group_id!r} was not verified: no commitments kept")
        if not self.done.is_set():
            raise WrongState(f"span {self.span} of round {self.group_id!r} is not reduced yet")
        blocks = checked_blocks(request, self.numel, block_count(self.numel))
        parts = [(self.signed[peer], self._parts[self._rows[peer]]) for peer in sorted(self.contributors)]
        reply, tensors = audit_answer(parts, blocks)
        return BulkAnswer(reply.SerializeToString(), [tensor_payload(t) for t in tensors])

    async def result(self) -> torch.Tensor:
        try:
            async with asyncio.timeout(max(0.0, self.deadline - time.monotonic())):
                await self.done.wait()
        except asyncio.TimeoutError:
            self.finish()  # the stragglers are left out
        assert self.mean is not None
        return self.mean


class AllReduceService:
    """Serves the Reduce bulk route for the rounds this peer reduces in. Register `handle` with
    `keeps_tensors=False`: parts are folded into the running sum as soon as they arrive."""

    def __init__(self, registration_timeout: float = 5.0):
        self.registration_timeout = registration_timeout
        self._reductions: dict[str, _SpanReduction] = {}
        self._registered: dict[str, asyncio.Event] = {}
        self._closed: dict[str, None] = {}  # recently finished rounds, oldest first
        self._audited: dict[str, _SpanReduction] = {}  # recent verified rounds' reductions, for audits
        self._own_parts: dict[str, OwnParts] = {}  # our weight and parts, by round
        self.buffers = _Buffers()

    def open(self, round_: GroupRound) -> None:
        """Starts accepting parts for this member's span of `round_`."""
        start, end = round_.spans[round_.own_index]
        self._reductions[round_.group_id] = _SpanReduction(round_, end - start, self.buffers)
        self._registered.setdefault(round_.group_id, asyncio.Event()).set()

    def close(self, group_id: str) -> None:
        reduction = self._reductions.pop(group_id, None)
        if reduction is not None and (reduction.verify or reduction.aggregator.robust):
            reduction.finish()  # a round cut short: no part may land in a buffer handed on below
        if reduction is not None and reduction.verify:
            for gone in _keep_recent(self._audited, group_id, reduction):
                self.buffers.give(gone._parts)
        elif reduction is not None and reduction.aggregator.robust:
            self.buffers.give(reduction._parts)
        self._registered.pop(group_id, None)
        self._closed[group_id] = None  # a late part is refused at once, not after a wait
        while len(self._closed) > _REMEMBERED_ROUNDS:
            self._closed.pop(next(iter(self._closed)))

    def keep_own_parts(self, group_id: str, own: OwnParts) -> None:
        """Serves our parts of a verified round on the Part route (for the next rounds too)."""
        for gone in _keep_recent(self._own_parts, group_id, own):
            self.buffers.give(gone.storage)

    def contribute_local(self, group_id: str, sender: str, part: torch.Tensor, weight: float,
                         signed: SignedPart | None = None) -> None:
        self._reductions[group_id].add(sender, part, weight, signed)

    async def local_result(self, group_id: str) -> torch.Tensor:
        return await self._reductions[group_id].result()

    async def handle(self, call: BulkCall) -> BulkAnswer:
        request = decode(ReduceRequest, call.body)  # InvalidRequest if malformed
        if not request.group_id or not request.sender:
            raise InvalidRequest("a Reduce request names its group_id and sender")
        reduction = await self._reduction_for(request.group_id)
        if request.numel != reduction.numel:
            raise InvalidRequest(f"span {request.span}: {request.numel} elements declared, this span has {reduction.numel}")
        codec, part = decode_part(request.codec, call.tensors, request.numel, f"part from {request.sender[:8]}")
        signed = None
        if reduction.verify:  # hashing the part runs beside the event loop (hashlib lets go of the GIL)
            reduction.admissible(request.sender, part, request.weight)  # before the hashing
            signed = await asyncio.to_thread(check_part, request.commitment, request.signature, request.group_id,
                                             request.span, request.sender, request.weight, part)
        reduction.add(request.sender, part, request.weight, signed)
        await reduction.result()
        reply = ReduceReply(codec=codec.name, numel=reduction.numel, contributors=len(reduction.contributors),
                            total_weight=reduction.weight)
        return BulkAnswer(reply.SerializeToString(), [tensor_payload(t) for t in reduction.encoded_mean(codec)])

    async def handle_audit(self, call: BulkCall) -> BulkAnswer:
        """The Audit route: what this peer combined for its span of a recent verified round."""
        request = decode(AuditRequest, call.body)
        reduction = self._reductions.get(request.group_id) or self._audited.get(request.group_id)
        if reduction is None or reduction.span != request.span:
            raise NotFoundHere(f"no verified reduction of span {request.span} of round {request.group_id!r} here")
        return reduction.audit(request)

    async def handle_part(self, call: BulkCall) -> BulkAnswer:
        """The Part route: our part of a span of a recent verified round."""
        request = decode(PartRequest, call.body)
        own = self._own_parts.get(request.group_id)
        if own is None or request.span not in own.parts:
            raise NotFoundHere(f"no part of span {request.span} of round {request.group_id!r} here")
        reply, tensors = part_answer(own.weight, own.parts[request.span].clone())  # its buffer may be reused
        return BulkAnswer(reply.SerializeToString(), [tensor_payload(t) for t in tensors])

    async def _reduction_for(self, group_id: str) -> _SpanReduction:
        """The reduction of `group_id`, waiting briefly if the part arrived before our own round began."""
        if group_id in self._closed:
            raise WrongState(f"all-reduce round {group_id!r} is over")
        event = self._registered.setdefault(group_id, asyncio.Event())
        try:
            async with asyncio.timeout(self.registration_timeout):
                await event.wait()
        except asyncio.TimeoutError:
            self._registered.pop(group_id, None)
            raise NotFoundHere(f"no all-reduce round {group_id!r} here") from None
        reduction = self._reductions.get(group_id)
        if reduction is None:
            raise WrongState(f"all-reduce round {group_id!r} is over")
        return reduction


@dataclass
class OwnParts:
    """Our weight and parts of one verified round (span -> part as its reducer decodes it), in one buffer."""

    weight: float
    storage: torch.Tensor
    parts: dict[int, torch.Tensor] = field(default_factory=dict)


def decode_part(codec_name: str, tensors: Sequence[tuple[TensorHeader, Any]], numel: int,
                what: str) -> tuple[Codec, torch.Tensor]:
    """The codec a peer named and the `numel` values it sent encoded by it; InvalidRequest naming
    `what` if they are malformed."""
    try:
        codec = codec_by_name(codec_name)
        return codec, codec.decode([tensor_from_payload(h, p) for h, p in tensors], numel)
    except (ValueError, InvalidRequest) as e:  # the codec's checks of what arrived, an unknown dtype
        raise InvalidRequest(f"malformed {what}: {e}") from None


def _keep_recent(kept: dict[str, Any], key: str, value: Any) -> list[Any]:
    """Keeps `value` under `key`; returns the values of the oldest rounds that no longer fit."""
    kept[key] = value
    gone = []
    while len(kept) > _AUDITED_ROUNDS:
        gone.append(kept.pop(next(iter(kept))))
    return gone

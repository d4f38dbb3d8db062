"""Checking that reducers return what their senders' parts combine to, and banning those that lie.

In a butterfly all-reduce the member that reduces a span can return anything for it; a robust
aggregator protects the inputs, not the reducer's output. With verification on:

1. Every sender commits to each part it sends: a Merkle root over the part's blocks of `BLOCK`
   float32 values (as the reducer decodes them), signed with the sender's Ed25519 key together
   with the group, span, weight and size (`PartCommitment`). A reducer refuses a part that does
   not match its signed commitment, and keeps the parts and commitments of its recent rounds.
2. After the round every member audits the spans others reduced for it: it picks blocks of each
   span at random (its own private randomness, so no reducer can tell which coordinates will be
   looked at when it answers) and asks the reducer (`Audit` route) for every contributor's
   values there, with Merkle proofs and signed commitments. It checks that each part is signed
   by a sender of the group and matches its proof, that its own part is there as it sent it, and
   that the aggregator applied to those values gives what the reducer returned to it, within the
   codec's error bound. For a rule that is not coordinate-wise (CenteredClip), whole spans drawn
   at random are audited instead and recomputed, as many as the same number of blocks allows
   (at least one).
3. A reducer that fails a check convicted itself by its own statements: what it returned and
   what it served signed by others. The auditor bans it locally (matchmaking leaves it out for
   the rest of the run) and replaces the span with the aggregate it recomputes from the parts
   every other sender serves (`Part` route). A reducer that does not answer its audit is not
   banned (an outage looks the same), but its span is recomputed all the same.

A sender that lies to an auditor cannot frame an honest reducer: the auditor checks what the
reducer serves against the senders' signatures, never against the senders' word.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from apiary.averaging.aggregation import Aggregation, Aggregator
from apiary.averaging.compression import codec_by_name
from apiary.averaging.protos.averaging_pb2 import AuditReply, AuditRequest, PartCommitment, PartReply, PartRequest
from apiary.wire import AddressError, Endpoint, Identity, InvalidRequest, WireError
from apiary.wire.bulk import BulkClient
from apiary.wire.identity import verify_signature
from apiary.wire.rpc import decode
from apiary.wire.tensors import tensor_from_payload

if TYPE_CHECKING:
    from apiary.averaging.allreduce import GroupRound

logger = logging.getLogger(__name__)

AUDIT_ROUTE = "apiary.averaging/Audit"
PART_ROUTE = "apiary.averaging/Part"
BLOCK = 1024  # float32 values per Merkle leaf (4 KiB)
_HASH = 32
_RELATIVE_SLACK = 1e-5  # float32 sums in another order: relative to the largest value combined


# ---- Merkle commitments over a part's blocks ----

def block_count(numel: int) -> int:
    return -(-numel // BLOCK)


def block_range(numel: int, block: int) -> tuple[int, int]:
    return block * BLOCK, min(numel, (block + 1) * BLOCK)


def _leaf(values: bytes | memoryview) -> bytes:
    digest = hashlib.sha256(b"\x00")
    digest.update(values)
    return digest.digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


_EMPTY = hashlib.sha256(b"\x02").digest()  # pads the leaves to a power of two


class PartTree:
    """The Merkle tree over one part's blocks: its root, and proofs that a block belongs to it."""

    def __init__(self, values: torch.Tensor):
        data = memoryview(values.detach().to(torch.float32).contiguous().numpy()).cast("B")  # no copy
        count = max(1, block_count(values.numel()))
        leaves = [_leaf(data[i * BLOCK * 4 : (i + 1) * BLOCK * 4]) for i in range(count)]
        leaves += [_EMPTY] * ((1 << (count - 1).bit_length()) - count)
        self.levels = [leaves]
        while len(self.levels[-1]) > 1:
            level = self.levels[-1]
            self.levels.append([_node(level[i], level[i + 1]) for i in range(0, len(level), 2)])

    @property
    def root(self) -> bytes:
        return self.levels[-1][0]

    def proof(self, block: int) -> bytes:
        """The sibling hashes from leaf `block` up to the root, concatenated."""
        siblings = []
        for level in self.levels[:-1]:
            siblings.append(level[block ^ 1])
            block //= 2
        return b"".join(siblings)


def block_matches(root: bytes, numel: int, block: int, values: torch.Tensor, proof: bytes) -> bool:
    """Whether `values` are block `block` of a part of `numel` elements whose tree has root `root`."""
    depth = (max(1, block_count(numel)) - 1).bit_length()
    if len(proof) != depth * _HASH or not 0 <= block < block_count(numel):
        return False
    digest = _leaf(values.to(torch.float32).contiguous().numpy().tobytes())
    for level in range(len(proof) // _HASH):
        sibling = proof[level * _HASH : (level + 1) * _HASH]
        digest = _node(sibling, digest) if block & 1 else _node(digest, sibling)
        block //= 2
    return digest == root


# ---- signed commitments ----

@dataclass(frozen=True)
class SignedPart:
    """A sender's commitment to one part (serialized `PartCommitment`), its signature, its tree."""

    commitment: bytes
    signature: bytes
    fields: PartCommitment
    tree: PartTree | None = None  # kept by the reducer, to prove blocks


def commit(identity: Identity, group_id: str, span: int, weight: float, values: torch.Tensor) -> SignedPart:
    """The sender's signed commitment to `values`, its part of span `span`."""
    tree = PartTree(values)
    fields = PartCommitment(group_id=group_id, span=span, sender=identity.peer_id, weight=weight,
                            numel=values.numel(), root=tree.root)
    commitment = fields.SerializeToString()
    return SignedPart(commitment, identity.sign(commitment), fields, tree)


def open_commitment(commitment: bytes, signature: bytes, group_id: str, span: int, numel: int) -> PartCommitment:
    """The fields of a commitment for span `span` of `group_id`; ValueError naming what is wrong."""
    try:
        fields = PartCommitment.FromString(commitment)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ValueError("commitment is not a PartCommitment") from None
    if fields.group_id != group_id or fields.span != span or fields.numel != numel:
        raise ValueError(f"commitment names group {fields.group_id!r} span {fields.span} of {fields.numel} "
                         f"elements, not group {group_id!r} span {span} of {numel}")
    if not verify_signature(fields.sender, signature, commitment):
        raise ValueError(f"commitment is not signed by its sender {fields.sender[:8]}")
    return fields


def check_part(commitment: bytes, signature: bytes, group_id: str, span: int, sender: str, weight: float,
               part: torch.Tensor) -> SignedPart:
    """The reducer's check of a part against its sender's signed commitment; InvalidRequest if it fails."""
    try:
        fields = open_commitment(commitment, signature, group_id, span, part.numel())
    except ValueError as e:
        raise InvalidRequest(f"part from {sender[:8]}: {e}") from None
    if fields.sender != sender or fields.weight != weight:
        raise InvalidRequest(f"part from {sender[:8]}: commitment is for sender {fields.sender[:8]} weight "
                             f"{fields.weight}, the request says weight {weight}")
    tree = PartTree(part)
    if tree.root != fields.root:
        raise InvalidRequest(f"part from {sender[:8]} does not match its commitment")
    return SignedPart(commitment, signature, fields, tree)


# ---- the reducer's answers ----

def audit_answer(parts: Sequence[tuple[SignedPart, torch.Tensor]], blocks: Sequence[int]) -> tuple[AuditReply, list[torch.Tensor]]:
    """What a reducer serves for an audit of `blocks`: for each contributor its signed commitment
    and proofs, and one tensor of its values in those blocks (concatenated)."""
    reply = AuditReply()
    tensors = []
    for signed, values in parts:
        assert signed.tree is not None
        entry = reply.parts.add(commitment=signed.commitment, signature=signed.signature)
        entry.proofs.extend(signed.tree.proof(b) for b in blocks)
        tensors.append(torch.cat([values[slice(*block_range(values.numel(), b))] for b in blocks]) if blocks
                       else torch.zeros(0))
    return reply, tensors


def checked_blocks(request: AuditRequest, numel: int, limit: int) -> list[int]:
    """The blocks an audit asks for; InvalidRequest if out of range, repeated or too many."""
    blocks = list(request.blocks)
    if len(blocks) > limit:
        raise InvalidRequest(f"audit asks for {len(blocks)} blocks, at most {limit}")
    if len(set(blocks)) != len(blocks) or any(not 0 <= b < block_count(numel) for b in blocks):
        raise InvalidRequest(f"audit blocks must be distinct, in [0, {block_count(numel)})")
    return sorted(blocks)


# ---- the auditor ----

@dataclass
class Outcome:
    span: int
    result: str  # "ok", "lying" or "unanswered"
    reason: str = ""


@dataclass
class Verifier:
    """This member's side of verification: signs its parts, audits others' spans, keeps its bans."""

    identity: Identity
    audit_blocks: int = 4  # blocks audited per span (coordinate-wise rules)
    audit_timeout: float = 10.0
    banned: dict[str, str] = field(default_factory=dict)  # peer id -> why, for the rest of the run
    audits: Counter[str] = field(default_factory=Counter)  # audited spans by result
    on_audit: Callable[[Outcome], None] | None = None  # told every audited span's outcome (metrics)

    def ban(self, peer_id: str, reason: str) -> None:
        if peer_id not in self.banned:
            self.banned[peer_id] = reason
            logger.warning("banning reducer %s for the rest of the run: %s", peer_id[:8], reason,
                           extra={"event": "peer_banned"})

    async def audit(self, round_: GroupRound, result: torch.Tensor, weight: float, answered: dict[int, str],
                    own: dict[int, SignedPart], own_parts: dict[int, torch.Tensor], client: BulkClient,
                    shunned: Collection[int] = ()) -> list[Outcome]:
        """Audits the spans others reduced for us (`answered`: span -> codec of the reducer's
        reply); a span that fails, or whose reducer does not answer, is replaced in `result` by
        the aggregate of the parts the other senders serve, as are the `shunned` spans (their
        reducers were banned before). Returns each audited span's outcome."""
        spans = [j for j in answered if j != round_.own_index]
        if not coordinatewise(round_.aggregator):
            spans = self._whole_spans(round_, spans)
        outcomes = await asyncio.gather(*(self._audit_span(round_, j, result, answered[j], own.get(j), client)
                                          for j in spans))
        for outcome in outcomes:
            self.audits[outcome.result] += 1
            if self.on_audit is not None:
                self.on_audit(outcome)
            if outcome.result == "lying":
                self.ban(round_.members[outcome.span].peer_id, outcome.reason)
        redo = sorted({o.span for o in outcomes if o.result != "ok"} | set(shunned))
        await asyncio.gather(*(self._recompute(round_, j, result, weight, own_parts.get(j), client) for j in redo))
        return list(outcomes)

    def _whole_spans(self, round_: GroupRound, spans: list[int]) -> list[int]:
        """Spans drawn at random to audit whole, as many as the blocks of sampled audits of every
        span would come to (at least one)."""
        budget = self.audit_blocks * len(spans)
        chosen: list[int] = []
        for span in random.sample(spans, len(spans)):
            start, end = round_.spans[span]
            if chosen and block_count(end - start) > budget:
                break
            chosen.append(span)
            budget -= block_count(end - start)
        return chosen

    async def _audit_span(self, round_: GroupRound, span: int, result: torch.Tensor, codec: str,
                          own: SignedPart | None, client: BulkClient) -> Outcome:
        start, end = round_.spans[span]
        count = block_count(end - start)
        blocks = (list(range(count)) if not coordinatewise(round_.aggregator)
                  else sorted(random.sample(range(count), min(self.audit_blocks, count))))
        reducer = round_.members[span]
        request = AuditRequest(group_id=round_.group_id, span=span, blocks=blocks)
        try:
            body, tensors = await client.call(Endpoint.parse(reducer.bulk_address), AUDIT_ROUTE,
                                              body=request.SerializeToString(), timeout=self.audit_timeout,
                                              peer_id=reducer.peer_id)
            reply = decode(AuditReply, body)
            values = [tensor_from_payload(h, p) for h, p in tensors]
        except (AddressError, WireError, InvalidRequest) as e:  # announced unreachable, failed, or answered garbage
            logger.warning("reducer %s did not answer the audit of span %d: %s", reducer.peer_id[:8], span, e)
            return Outcome(span, "unanswered", str(e))
        reason = self._problem(round_, span, blocks, reply, values, result[start:end], codec, own)
        return Outcome(span, "ok") if reason is None else Outcome(span, "lying", reason)

    def _problem(self, round_: GroupRound, span: int, blocks: list[int], reply: AuditReply,
                 values: list[torch.Tensor], received: torch.Tensor, codec: str, own: SignedPart | None) -> str | None:
        """Why the reducer's audit answer convicts it, or None if it holds."""
        numel = received.numel()
        senders = {m.peer_id for m in round_.members if m.sends}
        if len(values) != len(reply.parts):
            return f"served {len(values)} value tensors for {len(reply.parts)} parts"
        ranges = [block_range(numel, b) for b in blocks]
        width = sum(e - s for s, e in ranges)
        rows: dict[str, tuple[float, torch.Tensor]] = {}
        for entry, served in zip(reply.parts, values):
            try:
                fields = open_commitment(entry.commitment, entry.signature, round_.group_id, span, numel)
            except ValueError as e:
                return f"served a part its sender did not sign: {e}"
            if fields.sender not in senders or fields.sender in rows:
                return f"served a part of {fields.sender[:8]}, not one sender of the group"
            if served.numel() != width or len(entry.proofs) != len(blocks):
                return f"served {served.numel()} values and {len(entry.proofs)} proofs for {len(blocks)} blocks"
            offset = 0
            for block, (s, e), proof in zip(blocks, ranges, entry.proofs):
                if not block_matches(fields.root, numel, block, served[offset : offset + e - s], proof):
                    return f"served values of {fields.sender[:8]} that are not its committed part (block {block})"
                offset += e - s
            rows[fields.sender] = (fields.weight, served.to(torch.float32))
        if own is not None and self.identity.peer_id not in rows:  # what it serves of ours we signed ourselves
            return "left out our part"
        index = torch.cat([torch.arange(s, e) for s, e in ranges]) if ranges else torch.zeros(0, dtype=torch.long)
        returned = received[index]
        expected, bound = _recombined(round_.aggregator, rows, width)
        tolerance = _RELATIVE_SLACK * bound + 2 * codec_by_name(codec).error_bound(received)
        if round_.aggregator.kind is Aggregation.CENTERED_CLIP:
            tolerance += 1e-3 * round_.aggregator.clip_radius  # the stopping rule may end a step apart
        if width and float((returned - expected).abs().max()) > tolerance:
            error = float((returned - expected).abs().max())
            return f"returned values {error:.3g} away from what its parts combine to (tolerance {tolerance:.3g})"
        return None

    async def _recompute(self, round_: GroupRound, span: int, result: torch.Tensor, weight: float,
                         own_part: torch.Tensor | None, client: BulkClient) -> None:
        """Writes into `result` the span's aggregate over the parts every sender but its reducer
        serves (and ours); keeps our own values if none is to be had."""
        start, end = round_.spans[span]
        reducer = round_.members[span].peer_id
        me = round_.me.peer_id
        rows: dict[str, tuple[float, torch.Tensor]] = {}
        if own_part is not None:
            rows[me] = (weight, own_part)

        async def fetch(peer_id: str, address: str) -> None:
            request = PartRequest(group_id=round_.group_id, span=span)
            try:
                body, tensors = await client.call(Endpoint.parse(address), PART_ROUTE, body=request.SerializeToString(),
                                                  timeout=self.audit_timeout, peer_id=peer_id)
                reply = decode(PartReply, body)
                values = [tensor_from_payload(h, p) for h, p in tensors]
            except (AddressError, WireError, InvalidRequest) as e:  # announced unreachable, failed, or answered garbage
                logger.info("sender %s did not serve its part of span %d: %s", peer_id[:8], span, e)
                return
            if len(values) == 1 and values[0].numel() == end - start and reply.weight >= 0 \
                    and bool(torch.isfinite(values[0]).all()):
                rows[peer_id] = (reply.weight, values[0].to(torch.float32))

        others = [m for m in round_.members if m.sends and m.bulk_address and m.peer_id not in (me, reducer)
                  and m.peer_id not in self.banned]
        await asyncio.gather(*(fetch(m.peer_id, m.bulk_address) for m in others))
        if rows:
            result[start:end] = _recombined(round_.aggregator, rows, end - start)[0]
        elif own_part is not None:
            result[start:end] = own_part


def coordinatewise(aggregator: Aggregator) -> bool:
    """Whether each coordinate of the aggregate depends only on that coordinate of the parts."""
    return aggregator.kind is not Aggregation.CENTERED_CLIP


def _recombined(aggregator: Aggregator, rows: dict[str, tuple[float, torch.Tensor]], width: int) -> tuple[torch.Tensor, float]:
    """The aggregate of `rows` (in peer-id order, as a reducer combines them) and the largest
    absolute value combined."""
    if not rows:
        return torch.zeros(width), 0.0
    ordered = [rows[peer] for peer in sorted(rows)]
    parts = torch.stack([values for _, values in ordered])
    weights = torch.tensor([weight for weight, _ in ordered], dtype=torch.float32)
    bound = float(parts.abs().max()) if parts.numel() else 0.0
    return aggregator.combine(parts, weights), bound


def part_answer(weight: float, part: torch.Tensor) -> tuple[PartReply, list[torch.Tensor]]:
    return PartReply(weight=weight, numel=part.numel()), [part]


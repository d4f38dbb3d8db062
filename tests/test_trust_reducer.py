"""A lying reducer, end to end: 16 averagers (4 processes over real sockets, each averager its
own identity, DHT node, server and port) average fresh tensors in groups of 16. One of them
reduces honestly but adds a bias to the span it returns, every round (failure injection point
`bias_reduced_span` of `tests/averaging_worker.py`). With verification (`verify_reductions`)
every honest peer's result is the true mean (its audit catches the liar and recomputes the
liar's span from the honest senders' parts), and every honest peer bans the liar: from then on
it is left out of their groups. No honest peer is banned.

Also, in one process: commitments and audit answers that a reducer cannot forge."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from averaging_harness import PeerResult, make_tensors, run_swarm
from averaging_worker import bias_reduced_span
from prometheus_client import CollectorRegistry

from apiary.averaging.aggregation import Aggregation, Aggregator
from apiary.averaging.allreduce import REDUCE_ROUTE, AllReduceService, GroupRound, _SpanReduction
from apiary.averaging.compression import codec_by_name
from apiary.averaging.exchange import run_allreduce
from apiary.averaging.protos.averaging_pb2 import AuditReply, AuditRequest, PartRequest, ReduceRequest
from apiary.averaging.spans import Member, Role, shares, spans
from apiary.averaging.verification import (
    AUDIT_ROUTE, BLOCK, PART_ROUTE, Outcome, PartTree, Verifier, block_matches, commit,
)
from apiary.services.averager import AveragerMetrics
from apiary.wire import Endpoint, Identity, RpcServer, WireError, WireSettings
from apiary.wire.bulk import BulkClient
from apiary.wire.tensors import tensor_from_payload, tensor_payload

PEERS = 16
LIAR = 6
BIAS = 5.0
ROUNDS = 3
SHAPES = [[40, 64], [37]]  # 2597 values: spans of 162 or 163, one block each
BASE = {"prefix": "lying-reducer", "target_group_size": PEERS, "expected_peers": PEERS, "gather_seconds": 1.0,
        "join_seconds": 1.5, "sender_timeout": 3.0, "round_timeout": 10.0, "rounds": ROUNDS, "period": 5.0,
        "shapes": SHAPES, "fresh_each_round": True}


def run_peers(verify: bool) -> list[PeerResult]:
    """The 16 averagers: the first alone in its process (it starts the DHT), then 5 per process."""
    def peer(index: int) -> dict[str, Any]:
        faults = {"bias_reduced_span": {"bias": BIAS, "rounds": list(range(ROUNDS))}} if index == LIAR else {}
        return {"seed": index, "identity_seed": 500 + index, "faults": faults}

    common = {**BASE, "verify_reductions": verify}
    configs = [{**common, **peer(0)}]
    for first in range(1, PEERS, 5):
        configs.append({**common, **peer(first), "co_hosted": [peer(i) for i in range(first + 1, first + 5)]})
    return run_swarm(configs, timeout=ROUNDS * 5.0 + 40)


def expected_result(members: list[str], round_index: int, seed_of: dict[str, int], liar: str) -> torch.Tensor:
    """The mean of the members' tensors, where the liar reduced: the mean of the others' only."""
    parts = {peer_id: torch.cat([t.reshape(-1) for t in make_tensors(seed_of[peer_id], SHAPES, round_index)])
             for peer_id in members}
    expected = torch.stack(list(parts.values())).mean(dim=0)
    if liar in members:
        group = [Member(peer_id, "", Role.NODE, 1e8) for peer_id in members]
        start, end = spans(expected.numel(), shares(group))[members.index(liar)]
        honest = torch.stack([part for peer_id, part in parts.items() if peer_id != liar])
        expected[start:end] = honest[:, start:end].mean(dim=0)
    return expected


@pytest.mark.timeout(150)
def test_a_lying_reducer_is_caught_its_span_recomputed_and_it_is_banned() -> None:
    peers = run_peers(verify=True)
    seed_of = {p.peer_id: int(p.config["seed"]) for p in peers}
    liar = next(p.peer_id for p in peers if p.config["seed"] == LIAR)
    honest = [p for p in peers if p.peer_id != liar]
    assert len(peers) == PEERS
    assert sum(p.rounds[0].members is not None and liar in p.rounds[0].members for p in honest) >= 12, \
        [(r.members, r.error) for p in honest for r in p.rounds]  # the liar reduced for (nearly) everyone in round 0
    for p in honest:
        for record, result in zip(p.rounds, p.history):
            if record.members is None:
                continue  # no group this round (a loaded machine): the tensors are the peer's own
            expected = expected_result(record.members, record.round, seed_of, liar)
            error = float((result - expected).abs().max())
            assert error < 1e-4, (p.config["seed"], record.round, error, record.audits, record.error)
        banned = [record.banned for record in p.rounds]
        assert set(banned[0]) <= {liar} and banned[1] == [liar], (p.config["seed"], banned)  # within two rounds
        assert all(r.members is None or liar not in r.members for r in p.rounds[2:]), [r.members for r in p.rounds]
        assert p.rounds[-1].audits.get("lying", 0) >= 1


# ---- in one process: what a reducer cannot forge ----

def _members(identities: list[Identity]) -> list[Member]:
    return sorted((Member(i.peer_id, f"127.0.0.1:{2000 + n}", Role.NODE, 1e8) for n, i in enumerate(identities)),
                  key=lambda m: m.peer_id)


def test_a_merkle_proof_holds_for_its_block_only() -> None:
    values = torch.randn(5 * BLOCK + 17, generator=torch.Generator().manual_seed(2))
    tree = PartTree(values)
    numel = values.numel()
    for block in (0, 3, 5):
        chunk = values[block * BLOCK : (block + 1) * BLOCK]
        assert block_matches(tree.root, numel, block, chunk, tree.proof(block))
        assert not block_matches(tree.root, numel, block, chunk + 1e-6, tree.proof(block))
        assert not block_matches(tree.root, numel, (block + 1) % 6, chunk, tree.proof(block))
        assert not block_matches(tree.root, numel, block, chunk, tree.proof(block)[32:])  # a proof cut short


async def test_a_reducer_refuses_forged_parts_and_bad_audits_and_keeps_serving() -> None:
    identities = [Identity.generate() for _ in range(3)]
    members = _members(identities)
    reducer = next(i for i in identities if i.peer_id == members[0].peer_id)
    sender = next(i for i in identities if i.peer_id == members[1].peer_id)
    other = next(i for i in identities if i.peer_id == members[2].peer_id)
    server = RpcServer(WireSettings(listen_host="127.0.0.1", shutdown_grace=0.2), reducer)
    service = AllReduceService()
    assert server.bulk is not None
    server.bulk.add_route(REDUCE_ROUTE, service.handle, keeps_tensors=False)
    server.bulk.add_route(AUDIT_ROUTE, service.handle_audit)
    server.bulk.add_route(PART_ROUTE, service.handle_part)
    await server.start()
    members[0] = Member(reducer.peer_id, str(server.announced_bulk), Role.NODE, 1e8)
    round_ = GroupRound("g:1", members, 0, 3 * 300, sender_timeout=5.0, aggregator=Aggregator(), verify=True)
    service.open(round_)
    numel = round_.spans[0][1] - round_.spans[0][0]
    part = torch.randn(numel)
    signed = commit(sender, "g:1", 0, 1.0, part)
    forged = commit(other, "g:1", 0, 1.0, part)
    client = BulkClient(server.settings, identity=sender)

    async def send(values: torch.Tensor, weight: float, commitment: bytes, signature: bytes) -> None:
        request = ReduceRequest(group_id="g:1", sender=sender.peer_id, span=0, weight=weight, codec="none",
                                numel=numel, commitment=commitment, signature=signature)
        await client.call(Endpoint.parse(str(server.announced_bulk)), REDUCE_ROUTE, body=request.SerializeToString(),
                          tensors=[tensor_payload(values)], timeout=5, peer_id=reducer.peer_id)

    try:
        for values, weight, commitment, signature, message in [
            (part + 1.0, 1.0, signed.commitment, signed.signature, "does not match its commitment"),
            (part, 2.0, signed.commitment, signed.signature, "the request says weight 2.0"),
            (part, 1.0, forged.commitment, forged.signature, "commitment is for sender"),
            (part, 1.0, signed.commitment, forged.signature, "not signed by its sender"),
            (part, 1.0, b"", b"", "commitment"),
        ]:
            with pytest.raises(WireError, match=message):
                await send(values, weight, commitment, signature)
        service.contribute_local("g:1", reducer.peer_id, part, 1.0, commit(reducer, "g:1", 0, 1.0, part))
        service.contribute_local("g:1", other.peer_id, part, 1.0, commit(other, "g:1", 0, 1.0, part))
        await send(part, 1.0, signed.commitment, signed.signature)  # the reducer still serves, and takes this one
        assert torch.allclose(await service.local_result("g:1"), part)
        address = Endpoint.parse(str(server.announced_bulk))
        for route, body, message in [
            (AUDIT_ROUTE, AuditRequest(group_id="g:1", span=0, blocks=[0, 0]), "2 blocks, at most 1"),
            (AUDIT_ROUTE, AuditRequest(group_id="g:1", span=0, blocks=[7]), r"in \[0, 1\)"),
            (AUDIT_ROUTE, AuditRequest(group_id="g:1", span=2, blocks=[0]), "no verified reduction of span 2"),
            (AUDIT_ROUTE, AuditRequest(group_id="other", span=0), "no verified reduction"),
            (PART_ROUTE, PartRequest(group_id="g:1", span=0), "no part of span 0"),
        ]:
            with pytest.raises(WireError, match=message):
                await client.call(address, route, body=body.SerializeToString(), timeout=5, peer_id=reducer.peer_id)
        answer, tensors = await client.call(address, AUDIT_ROUTE, timeout=5, peer_id=reducer.peer_id,
                                            body=AuditRequest(group_id="g:1", span=0, blocks=[0]).SerializeToString())
        assert len(AuditReply.FromString(answer).parts) == len(tensors) == 3  # it still serves
    finally:
        await client.close()
        await server.stop(0)


async def test_an_auditor_convicts_a_reducer_by_its_own_answers_only() -> None:
    identities = [Identity.generate() for _ in range(4)]
    members = _members(identities)
    by_id = {i.peer_id: i for i in identities}
    round_ = GroupRound("g:2", members, 0, 4 * 3000, sender_timeout=5.0, aggregator=Aggregator(), verify=True)
    start, end = round_.spans[0]
    reduction = _SpanReduction(round_, end - start)
    parts = {m.peer_id: torch.randn(end - start) for m in members}
    for member in members:
        signed = commit(by_id[member.peer_id], "g:2", 0, 1.0, parts[member.peer_id])
        reduction.add(member.peer_id, parts[member.peer_id], 1.0, signed)
    honest = await reduction.result()
    auditor_id = members[1].peer_id
    auditor = Verifier(by_id[auditor_id])
    answer = reduction.audit(AuditRequest(group_id="g:2", span=0, blocks=[0, 2]))
    reply = AuditReply.FromString(answer.body)
    values = [tensor_from_payload(header, bytearray(payload)) for header, payload in answer.tensors]  # as received
    own = commit(by_id[auditor_id], "g:2", 0, 1.0, parts[auditor_id])
    assert auditor._problem(round_, 0, [0, 2], reply, values, honest.clone(), "none", own) is None
    biased = honest.clone()
    biased[2 * BLOCK + 5] += 0.01
    assert "away from what its parts combine to" in auditor._problem(round_, 0, [0, 2], reply, values, biased, "none", own)
    forged = [v.clone() for v in values]
    forged[0][3] += 1.0
    assert "not its committed part" in auditor._problem(round_, 0, [0, 2], reply, forged, honest.clone(), "none", own)
    dropped = AuditReply(parts=[p for p in reply.parts if p.commitment != own.commitment])
    kept = [v for p, v in zip(reply.parts, values) if p.commitment != own.commitment]
    assert auditor._problem(round_, 0, [0, 2], dropped, kept, honest.clone(), "none", own) == "left out our part"


def test_the_averager_service_counts_audits_and_banned_reducers() -> None:
    registry = CollectorRegistry()
    metrics = AveragerMetrics(registry)
    verifier = Verifier(Identity.generate())
    metrics.watch_verifier(verifier)
    assert registry.get_sample_value("apiary_averager_banned_peers") == 0
    liar = Identity.generate().peer_id
    verifier.ban(liar, "returned values 5 away from what its parts combine to")
    verifier.ban(liar, "again")  # one ban per peer, the first reason kept
    assert verifier.banned == {liar: "returned values 5 away from what its parts combine to"}
    assert registry.get_sample_value("apiary_averager_banned_peers") == 1
    assert verifier.on_audit is not None
    verifier.on_audit(Outcome(3, "lying", "returned values 5 away"))
    assert registry.get_sample_value("apiary_averager_audits_total", {"result": "lying"}) == 1
    assert registry.get_sample_value("apiary_averager_audits_total", {"result": "ok"}) == 0


async def _three_members(answers_audits: bool, aggregator: Aggregator, numel: int) -> tuple[list[torch.Tensor], list[Verifier], list[torch.Tensor], GroupRound]:
    """One all-reduce of three members over real sockets; the first adds 1.0 to the span it
    reduces, and answers audits only if `answers_audits`. Returns the inputs, the verifiers, the
    results and the first member's round."""
    identities = sorted((Identity.generate() for _ in range(3)), key=lambda i: i.peer_id)
    servers, services, clients = [], [], []
    try:
        for n, identity in enumerate(identities):
            server = RpcServer(WireSettings(listen_host="127.0.0.1", shutdown_grace=0.2), identity)
            service = AllReduceService()
            assert server.bulk is not None
            server.bulk.add_route(REDUCE_ROUTE, service.handle, keeps_tensors=False)
            server.bulk.add_route(PART_ROUTE, service.handle_part)
            if n != 0 or answers_audits:
                server.bulk.add_route(AUDIT_ROUTE, service.handle_audit)
            await server.start()
            servers.append(server)
            services.append(service)
            clients.append(BulkClient(server.settings, identity=identity))
        members = [Member(i.peer_id, str(s.announced_bulk), Role.NODE, 1e8) for i, s in zip(identities, servers)]
        vectors = [torch.randn(numel, generator=torch.Generator().manual_seed(n)) for n in range(3)]
        verifiers = [Verifier(identity) for identity in identities]
        bias_reduced_span(services[0], 1.0, lambda: True)
        rounds = [GroupRound("g:3", members, n, numel, 5.0, aggregator, verify=True) for n in range(3)]
        results = await asyncio.gather(*(
            run_allreduce(rounds[n], vectors[n], 1.0, service=services[n], client=clients[n],
                          codec=codec_by_name("none"), deadline=30, verifier=verifiers[n])
            for n in range(3)
        ))
        return vectors, verifiers, list(results), rounds[0]
    finally:
        for client in clients:
            await client.close()
        for server in servers:
            await server.stop(0)


async def test_a_reducer_that_does_not_answer_its_audit_has_its_span_recomputed_but_is_not_banned() -> None:
    vectors, verifiers, results, round_ = await _three_members(False, Aggregator(), 3000)
    mean = torch.stack(vectors).mean(dim=0)
    start, end = round_.spans[0]
    honest = torch.stack([vectors[1], vectors[2]])[:, start:end].mean(dim=0)  # the silent reducer's part left out
    for n in (1, 2):
        assert verifiers[n].audits["unanswered"] == 1 and verifiers[n].banned == {}
        assert torch.allclose(results[n][end:], mean[end:], atol=1e-6)  # the spans that answered
        assert torch.allclose(results[n][start:end], honest, atol=1e-6)


async def test_with_centered_clip_auditors_recompute_whole_spans_and_catch_the_liar() -> None:
    aggregator = Aggregator(Aggregation.CENTERED_CLIP, clip_radius=5.0)
    vectors, verifiers, results, round_ = await _three_members(True, aggregator, 3 * 2 * BLOCK)
    start, end = round_.spans[0]
    for n in (1, 2):  # each audits the other two spans whole: the blocks 4 per span would come to
        assert verifiers[n].audits == {"lying": 1, "ok": 1}
        assert list(verifiers[n].banned) == [round_.me.peer_id]
        parts = torch.stack([vectors[1], vectors[2]])[:, start:end]
        assert torch.allclose(results[n][start:end], aggregator.combine(parts, torch.ones(2)), atol=1e-5)

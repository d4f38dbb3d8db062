"""Averaging rounds end to end: peers in processes of their own (`averaging_harness`) find each
other through the DHT, form groups and all-reduce their tensors; the tests recompute every
peer's tensors from its seed and check what each peer ends with.

Covered: mixed node/client/aux modes with weights (exact weighted mean), Moshpit rounds of
eight peers in groups of two (mean preserved, disagreement shrinking, a peer left out of its
line averaging later), faults in a round (a stalled sender, a slow one, a peer that stops
reducing), mismatched schemas and malformed parts (in-process), a cancelled round (in-process)
and every codec (result within the codec's stated bound).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from averaging_harness import PeerResult, make_tensors, run_swarm
from averaging_worker import identity_from_seed

from apiary.averaging.allreduce import REDUCE_ROUTE
from apiary.averaging.averager import Averager, AveragerSettings
from apiary.averaging.compression import codec_by_name
from apiary.averaging.flat import flatten
from apiary.averaging.protos.averaging_pb2 import ReduceRequest
from apiary.averaging.spans import Member, Role, shares, spans
from apiary.dht import DHTNode
from apiary.wire import Endpoint, Identity, PeerAddress, RequestRejected, RpcServer, WireSettings
from apiary.wire.bulk import BulkCall, BulkClient
from apiary.wire.tensors import tensor_payload

SHAPES = [[32, 4], [9]]  # 137 elements: spans of uneven sizes


# ---------------------------------------------------------------- helpers


def flat_inputs(seed: int, shapes: list[list[int]] = SHAPES, round_index: int = 0) -> torch.Tensor:
    return flatten(make_tensors(seed, shapes, round_index))


def weighted_mean(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = sum(weights)
    return sum(w * v.double() for v, w in zip(vectors, weights)) / total


def group_spans(members: Sequence[tuple[str, str, float]], total: int) -> dict[str, tuple[int, int]]:
    """{peer id: its span} for a group of (peer id, mode, bandwidth), as every member computes it."""
    ordered = sorted(members)
    group = [Member(peer_id, "", Role(mode), bandwidth) for peer_id, mode, bandwidth in ordered]
    return {member.peer_id: span for member, span in zip(group, spans(total, shares(group)))}


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def describe_rounds(results: list[PeerResult]) -> str:
    lines = []
    for result in results:
        rounds = ", ".join(f"{r.size}{'!' + r.error if r.error else ''} ({r.seconds:.1f}s)" for r in result.rounds)
        lines.append(f"peer {result.index} {result.peer_id[:8]}: {rounds}")
    return "\n".join(lines)


# ---------------------------------------------------------------- modes and weights


def test_mixed_modes_end_with_the_exact_weighted_mean():
    modes = ["node", "node", "client", "aux"]
    weights = [1.0, 2.5, 4.0, 0.0]
    bandwidths = [1e8, 3e8, 5e7, 2e8]  # uneven spans
    configs = [{"mode": mode, "weight": weight, "bandwidth": bandwidth, "seed": 10 + index, "shapes": SHAPES,
                "target_group_size": 4, "expected_peers": 4}
               for index, (mode, weight, bandwidth) in enumerate(zip(modes, weights, bandwidths))]
    results = run_swarm(configs)

    assert [r.rounds[0].size for r in results] == [4, 4, 4, 4], describe_rounds(results)
    senders = [r for r in results if r.config["mode"] != "aux"]
    expected = weighted_mean([flat_inputs(r.config["seed"]) for r in senders], [r.config["weight"] for r in senders])
    for result in senders:
        assert torch.equal(flatten(result.initial), flat_inputs(result.config["seed"]))
        final = flatten(result.final)
        assert max_error(final, expected) <= 1e-6, f"{result.config['mode']} peer {result.index}"
        assert [tuple(t.shape) for t in result.final] == [tuple(s) for s in SHAPES]
    aux = results[3]
    assert torch.equal(flatten(aux.final), flatten(aux.initial))  # contributes and receives nothing


# ---------------------------------------------------------------- Moshpit rounds of eight peers

MOSHPIT = {"target_group_size": 2, "min_group_size": 2, "expected_peers": 8, "shapes": SHAPES,
           "gather_seconds": 1.0, "join_seconds": 1.0, "period": 2.6}  # a round takes at most ~2.1 s


def replay_groups(results: list[PeerResult], rounds: int) -> list[torch.Tensor]:
    """Checks every round against the groups the peers report: each member of a group ends with
    the plain mean of the group's tensors before the round, the others keep theirs. Returns the
    stacked tensors (peers x elements) before round 0 and after each round."""
    by_id = {r.peer_id: i for i, r in enumerate(results)}
    states = [torch.stack([flatten(r.initial) for r in results])]
    for round_index in range(rounds):
        before = states[-1]
        after = torch.stack([r.history[round_index] for r in results])
        for i, result in enumerate(results):
            record = result.rounds[round_index]
            assert record.error is None, f"peer {i} round {round_index}: {record.error}"
            if record.size is None:
                assert torch.equal(after[i], before[i]), f"peer {i} changed in round {round_index} without a group"
                continue
            assert record.size == 2 and record.members is not None and len(record.members) == 2
            for member in record.members:  # every member reports the same group
                assert results[by_id[member]].rounds[round_index].members == record.members
            expected = before[[by_id[m] for m in record.members]].double().mean(0)
            assert max_error(after[i], expected) <= 1e-6, f"peer {i} round {round_index}"
        states.append(after)
    return states


def disagreement(state: torch.Tensor) -> float:
    """Sum over peers of the squared distance to the peers' mean."""
    state = state.double()
    return (state - state.mean(0)).pow(2).sum().item()


def test_eight_peers_in_groups_of_two_reach_the_global_mean_within_five_rounds():
    """Eight peers, groups of two, five rounds. The first round places every peer on a 2x2x2
    grid by its rank among all peers; the next rounds average along the other two axes, so every
    peer holds the global mean after three rounds (and keeps it). The mean over peers never
    moves, and every round's groups are replayed exactly from what the peers reported."""
    rounds = 5
    configs = [{**MOSHPIT, "seed": 100 + i, "rounds": rounds} for i in range(8)]
    results = run_swarm(configs)
    states = replay_groups(results, rounds)

    global_mean = states[0].double().mean(0)
    report = []
    for round_index, state in enumerate(states):
        deviation = max_error(state, global_mean.expand_as(state))
        report.append(f"after {round_index} rounds: max |x - mean| {deviation:.3g}, "
                      f"disagreement {disagreement(state) / disagreement(states[0]):.3g} of the initial")
        assert max_error(state.double().mean(0), global_mean) <= 1e-5, f"mean moved by round {round_index}"
    print("\n".join(report))
    for before, after in zip(states, states[1:]):
        assert disagreement(after) <= disagreement(before) * (1 + 1e-6)
    assert all(record.size == 2 for r in results for record in r.rounds), describe_rounds(results)
    assert max_error(states[-1], global_mean.expand_as(states[-1])) <= 1e-5, "\n".join(report)


def test_a_peer_left_out_of_its_line_moves_and_averages_later():
    """A grid stuck as hivemind-style Moshpit grids can get stuck: two peers share corner
    (1,1,1), (0,0,0) is empty, and every line through (1,1,1) holds three peers, of which the
    peer ranked in the middle (by peer id) is the odd one out each time. Unless a peer left out of
    a round moves, it is left out of every round and never averages with anyone."""
    ids = sorted((identity_from_seed(seed).peer_id, seed) for seed in range(8))
    # by peer-id rank: three edge peers, three face peers, the stuck peer, its twin
    corners = [[1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]]
    rounds = 3  # one full cycle over the three axes
    configs = [{**MOSHPIT, "seed": 200 + rank, "identity_seed": seed, "grid_coords": corner, "rounds": rounds}
               for rank, ((_, seed), corner) in enumerate(zip(ids, corners))]
    results = run_swarm(configs)
    assert [r.peer_id for r in results] == [peer_id for peer_id, _ in ids]
    states = replay_groups(results, rounds)

    never = [r.index for r in results if all(record.size is None for record in r.rounds)]
    assert not never, f"peers {never} were left out of every round:\n{describe_rounds(results)}"
    global_mean = states[0].double().mean(0)
    assert max_error(states[-1].double().mean(0), global_mean) <= 1e-5


# ---------------------------------------------------------------- faults within a round


def test_stalled_slow_and_non_reducing_peers():
    """Five nodes: 0 stalls its sending past the sender timeout, 1 sends late but in time, 2 stops
    reducing (its Reduce route fails), 3 and 4 are healthy."""
    sender_timeout, gather, join = 2.0, 1.0, 1.0
    faults = [{"stall_sending": sender_timeout + 1.0}, {"slow": 0.5}, {"stop_reducing": True}, {}, {}]
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    configs = [{"seed": 300 + i, "weight": weights[i], "faults": fault, "shapes": SHAPES, "target_group_size": 5,
                "expected_peers": 5, "sender_timeout": sender_timeout, "gather_seconds": gather,
                "join_seconds": join, "round_timeout": 20.0}
               for i, fault in enumerate(faults)]
    results = run_swarm(configs)
    stalled, slow, stopped = results[0], results[1], results[2]
    survivors = results[1:]

    assert [r.rounds[0].size for r in results] == [5] * 5, describe_rounds(results)
    bound = gather + join + sender_timeout + 1.0
    for result in survivors:
        assert result.rounds[0].seconds <= bound, f"peer {result.index}: {describe_rounds(results)}"

    inputs = [flat_inputs(r.config["seed"]) for r in results]
    by_span = group_spans([(r.peer_id, "node", 1e8) for r in results], inputs[0].numel())
    everyone = weighted_mean(inputs, weights)
    healthy = weighted_mean(inputs[1:], weights[1:])  # the stalled sender's parts came too late
    for result in results:
        final = flatten(result.final)
        for reducer in results:
            start, end = by_span[reducer.peer_id]
            where = f"peer {result.index}, span of peer {reducer.index}"
            if reducer is stopped:  # everyone keeps its local values
                expected = inputs[result.index][start:end]
            elif reducer is stalled:  # its own part is local: its span has everyone's
                expected = everyone[start:end]
            elif result is stalled:  # its calls failed: it keeps its values
                expected = inputs[result.index][start:end]
            else:
                expected = healthy[start:end]
            assert end > start and max_error(final[start:end], expected) <= 1e-6, where
    assert slow.rounds[0].error is None and stopped.rounds[0].error is None


# ---------------------------------------------------------------- codecs

CODEC_NAMES = ["none", "float16", "scaled_float16", "uniform8", "blockwise8"]


def test_every_codec_stays_within_its_error_bound():
    """Three nodes, one round per codec, fresh tensors each round (12,300 elements: spans of
    about 4,100, so blockwise8 uses two blocks per span). The sender's part and the reducer's
    reply are each encoded once, so the bound is the inputs' bound plus the mean's."""
    shapes = [[100, 120], [300]]
    weights = [1.0, 2.0, 3.0]
    configs = [{"seed": 400 + i, "weight": weights[i], "shapes": shapes, "codec": CODEC_NAMES, "rounds": len(CODEC_NAMES),
                "fresh_each_round": True, "target_group_size": 3, "expected_peers": 3, "period": 2.6}
               for i in range(3)]
    results = run_swarm(configs)

    for round_index, name in enumerate(CODEC_NAMES):
        codec = codec_by_name(name)
        assert [r.rounds[round_index].size for r in results] == [3, 3, 3], describe_rounds(results)
        assert all(r.rounds[round_index].codec == name for r in results)
        inputs = [flat_inputs(r.config["seed"], shapes, round_index) for r in results]
        mean = weighted_mean(inputs, weights).float()
        by_span = group_spans([(r.peer_id, "node", 1e8) for r in results], mean.numel())
        worst = 0.0
        for start, end in by_span.values():
            bound = max(codec.error_bound(x[start:end]) for x in inputs) + codec.error_bound(mean[start:end])
            for result in results:
                error = max_error(result.history[round_index][start:end], mean[start:end])
                assert error <= bound * 1.01 + 1e-6, f"{name}: peer {result.index} error {error:.3g} > bound {bound:.3g}"
                worst = max(worst, error)
        if name == "none":
            assert worst <= 1e-6
        else:
            assert worst > 1e-6, f"{name}: exact results, so the codec was not used on the wire"


def test_gradient_and_state_rounds_use_their_own_codecs():
    """Three nodes with codec quantile8 and state_codec float16: a gradient round, then a state
    round (numbered from STATE_ROUNDS). Each stays within its codec's bound, and the gradient
    round's error is beyond float16's: the roles were sent with different codecs."""
    shapes = [[100, 120], [300]]
    weights = [1.0, 2.0, 3.0]
    configs = [{"seed": 500 + i, "weight": weights[i], "shapes": shapes, "codec": "quantile8", "state_codec": "float16",
                "state_rounds": [1], "rounds": 2, "fresh_each_round": True, "target_group_size": 3,
                "expected_peers": 3, "period": 2.6}
               for i in range(3)]
    results = run_swarm(configs)

    inputs = [[flat_inputs(r.config["seed"], shapes, round_index) for r in results] for round_index in range(2)]
    means = [weighted_mean(inputs[round_index], weights).float() for round_index in range(2)]
    by_span = group_spans([(r.peer_id, "node", 1e8) for r in results], means[0].numel())

    def bound(name: str, round_index: int, start: int, end: int) -> float:
        codec = codec_by_name(name)
        return (max(codec.error_bound(x[start:end]) for x in inputs[round_index])
                + codec.error_bound(means[round_index][start:end]))

    for round_index, name in enumerate(["quantile8", "float16"]):
        assert [r.rounds[round_index].size for r in results] == [3, 3, 3], describe_rounds(results)
        assert all(r.rounds[round_index].codec == name for r in results)
        for start, end in by_span.values():
            for result in results:
                error = max_error(result.history[round_index][start:end], means[round_index][start:end])
                assert error <= bound(name, round_index, start, end) * 1.01 + 1e-6
    start, end = next(iter(by_span.values()))
    gradient_error = max_error(results[0].history[0][start:end], means[0][start:end])
    assert gradient_error > 2 * bound("float16", 0, start, end)


# ---------------------------------------------------------------- in-process groups


@dataclass
class LocalPeer:
    dht: DHTNode
    server: RpcServer
    averager: Averager
    original: list[torch.Tensor]

    @property
    def peer_id(self) -> str:
        return self.averager.peer_id

    @property
    def bulk(self) -> Endpoint:
        assert self.server.announced_bulk is not None
        return self.server.announced_bulk


@contextlib.asynccontextmanager
async def local_group(shapes: list[list[list[int]]], **settings: Any) -> AsyncIterator[list[LocalPeer]]:
    """One averager per entry of `shapes` (its tensor shapes), each with a DHT node and a server."""
    first = await DHTNode.launch()
    peers: list[LocalPeer] = []
    try:
        for index, peer_shapes in enumerate(shapes):
            dht = await DHTNode.launch([PeerAddress.parse(first.address)])
            identity = Identity.generate()
            server = RpcServer(WireSettings(listen_host="127.0.0.1", shutdown_grace=0.2), identity)
            tensors = make_tensors(500 + index, peer_shapes)
            averager = Averager(tensors, dht, identity.peer_id, AveragerSettings(prefix="local", **settings))
            peers.append(LocalPeer(dht, server, averager, [t.clone() for t in tensors]))
            averager.attach(server)
            await server.start()
        yield peers
    finally:
        for peer in peers:
            await peer.averager.close()
            await peer.server.stop(0)
            await peer.dht.shutdown()
        await first.shutdown()


def delay_sending(peer: LocalPeer, seconds: float) -> None:
    """Makes the peer's outgoing Reduce calls wait `seconds` first."""
    original = peer.averager.bulk_client.call

    async def delayed(endpoint: Any, route: str, **kwargs: Any) -> Any:
        if route == REDUCE_ROUTE:
            await asyncio.sleep(seconds)
        return await original(endpoint, route, **kwargs)

    peer.averager.bulk_client.call = delayed  # type: ignore[method-assign]


def watch_parts(peer: LocalPeer) -> list[ReduceRequest]:
    """Records the well-formed Reduce requests that reach the peer (then serves them as usual)."""
    seen: list[ReduceRequest] = []

    async def spy(call: BulkCall) -> Any:
        with contextlib.suppress(Exception):
            seen.append(ReduceRequest.FromString(call.body))
        return await peer.averager.reductions.handle(call)

    assert peer.server.bulk is not None
    peer.server.bulk.add_route(REDUCE_ROUTE, spy)
    return seen


async def wait_for(condition: Any, timeout: float = 15.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


async def test_mismatched_schema_is_left_out_and_malformed_parts_are_rejected():
    good, other = [[16, 4], [9]], [[16, 4], [10]]
    async with local_group([good, good, good, other], target_group_size=4, expected_peers=4, sender_timeout=4.0,
                           gather_seconds=1.0, join_seconds=1.0) as peers:
        reducer, fast, slow, odd = peers
        seen = watch_parts(reducer)
        delay_sending(slow, 1.5)  # keeps the reducer's span open while malformed parts arrive
        weights = [1.0, 2.0, 3.0, 1.0]
        steps = [asyncio.ensure_future(p.averager.step(w)) for p, w in zip(peers, weights)]
        try:
            await wait_for(lambda: any(r.sender == fast.peer_id for r in seen))
            genuine = next(r for r in seen if r.sender == fast.peer_id)
            numel = genuine.numel
            client = BulkClient(WireSettings())

            async def send(body: bytes, tensors: list[torch.Tensor]) -> str:
                with pytest.raises(RequestRejected) as info:
                    await client.call(reducer.bulk, REDUCE_ROUTE, body=body, timeout=5.0,
                                      tensors=[tensor_payload(t) for t in tensors])
                return str(info.value)

            def request(**changes: Any) -> bytes:
                fields = {"group_id": genuine.group_id, "sender": fast.peer_id, "span": genuine.span, "weight": 1.0,
                          "codec": "none", "numel": numel, **changes}
                return ReduceRequest(**fields).SerializeToString()

            try:
                message = await send(request(numel=numel + 3), [torch.zeros(numel + 3)])
                assert f"{numel + 3} elements declared" in message and f"has {numel}" in message
                message = await send(request(codec="zip9"), [torch.zeros(numel)])
                assert "unknown codec 'zip9'" in message
                message = await send(b"\xff\xffnot a protobuf", [torch.zeros(numel)])
                assert "malformed apiary.averaging.ReduceRequest" in message
                message = await send(request(), [torch.zeros(numel, dtype=torch.float64)])
                assert "float32" in message
                message = await send(request(sender="intruder"), [torch.zeros(numel)])
                assert "not a sender of this group" in message
            finally:
                await client.close()
            sizes = await asyncio.wait_for(asyncio.gather(*steps), 30)
        finally:
            for step in steps:
                step.cancel()

        assert sizes == [3, 3, 3, None]
        expected = weighted_mean([flatten(p.original) for p in peers[:3]], weights[:3])
        for peer in peers[:3]:
            assert max_error(flatten(peer.averager.tensors), expected) <= 1e-6
        assert all(torch.equal(t, o) for t, o in zip(odd.averager.tensors, odd.original))


async def test_a_cancelled_round_leaves_the_tensors_as_they_were():
    async with local_group([SHAPES] * 3, target_group_size=3, expected_peers=3, sender_timeout=1.5,
                           gather_seconds=0.5, join_seconds=1.0) as peers:
        cancelled, *others = peers
        seen = watch_parts(cancelled)
        original_call = cancelled.averager.bulk_client.call
        delay_sending(cancelled, 30.0)
        steps = [asyncio.ensure_future(p.averager.step(1.0)) for p in peers]
        try:
            # both others' parts reached it: its own span is reduced and written into the
            # round's result; its calls to the others are still pending
            await wait_for(lambda: {r.sender for r in seen} == {p.peer_id for p in others})
            await asyncio.sleep(0.1)
            steps[0].cancel()
            with pytest.raises(asyncio.CancelledError):
                await steps[0]
            for tensor, original in zip(cancelled.averager.tensors, cancelled.original):
                assert torch.equal(tensor, original)
            assert await asyncio.wait_for(asyncio.gather(*steps[1:]), 15) == [3, 3]
        finally:
            for step in steps:
                step.cancel()

        # the others averaged without its parts on their spans
        inputs = [flatten(p.original) for p in peers]
        by_span = group_spans([(p.peer_id, "node", 1e8) for p in peers], inputs[0].numel())
        for peer in others:
            for reducer in peers:
                start, end = by_span[reducer.peer_id]
                contributors = inputs if reducer is cancelled else inputs[1:]
                expected = weighted_mean([x[start:end] for x in contributors], [1.0] * len(contributors))
                assert max_error(flatten(peer.averager.tensors)[start:end], expected) <= 1e-6

        # and the cancelled averager takes part in the next round as usual
        cancelled.averager.bulk_client.call = original_call  # type: ignore[method-assign]
        before = [flatten(p.averager.tensors) for p in peers]
        assert await asyncio.wait_for(asyncio.gather(*(p.averager.step(1.0) for p in peers)), 20) == [3, 3, 3]
        expected = weighted_mean(before, [1.0, 1.0, 1.0])
        for peer in peers:
            assert max_error(flatten(peer.averager.tensors), expected) <= 1e-6

"""A decentralized averager: finds a group through the DHT and averages tensors in it.

`Averager.step()` runs one round: matchmaking (`matchmaking.Matchmaker`) under the Moshpit
group key of the round (`grid.MoshpitGrid`), then butterfly all-reduce (`allreduce`) of the
averager's tensors, weighted by the caller's weight. The averaged values replace the tensors'
only when the round succeeds; a failed or cancelled round leaves them untouched.

`Averager.prepare(round)` forms a round's group ahead of time (while the trainer still computes
its last batches); that round's `step()` then goes straight to the all-reduce. Peers that found
no group early meet again under the round's retry key when their tensors are ready.

Rounds numbered from `STATE_ROUNDS` up are state rounds (parameters, optimizer statistics),
the others gradient rounds; each role has its codec setting (`codec`, `state_codec`; the state
sent to newcomers, `download_codec`, is the service's: `apiary.averaging.state`).

`Averager.register(tensors)` changes the tensors averaged between rounds (a new schema forms
groups anew). The averager counts the all-reduce tensor bytes it sends and receives; whoever
runs it observes them and each round's `RoundResult` through hooks given at construction
(`on_bytes_sent`, `on_bytes_received`, `on_round`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field, field_validator

from apiary import faults
from apiary.averaging.aggregation import Aggregation, Aggregator
from apiary.averaging.allreduce import REDUCE_ROUTE, AllReduceService, GroupRound
from apiary.averaging.api.spec import FAILED, NO_GROUP, OK, Schema
from apiary.averaging.compression import AdaptiveCodec
from apiary.averaging.compression.selection import codec_selection
from apiary.averaging.exchange import run_allreduce
from apiary.averaging.flat import flatten, unflatten_into
from apiary.averaging.grid import MoshpitGrid
from apiary.averaging.matchmaking import MATCHMAKING, Matchmaker, MatchmakingSettings
from apiary.dht.interface import DHTLike
from apiary.averaging.spans import Member, Role
from apiary.averaging.verification import AUDIT_ROUTE, PART_ROUTE, Verifier
from apiary.wire import CallContext, ChannelPool, RpcServer
from apiary.wire.bulk import BulkAnswer, BulkCall, BulkClient
from apiary.wire.protos.wire_pb2 import TensorHeader
from apiary.averaging.protos.averaging_pb2 import JoinReply, JoinRequest

logger = logging.getLogger(__name__)

STATE_ROUNDS = 1 << 32  # rounds numbered from here are state rounds, apart from the epochs' gradient rounds
GRADIENTS, STATE = "gradients", "state"  # the roles of rounds


class AveragerSettings(BaseModel):
    prefix: str = Field(..., description="the run's name: peers of one run average together")
    mode: Role = Field(Role.NODE, description="node, client (behind NAT: sends only) or aux (reduces only)")
    target_group_size: int = Field(16, ge=1)
    min_group_size: int = Field(2, ge=1)
    expected_peers: int = Field(16, ge=1, description="swarm size the Moshpit grid is shaped for")
    bandwidth: float = Field(1e8, gt=0, description="declared link bandwidth, bytes/s")
    codec: str = Field("none", description="compression of the gradient rounds' parts on the wire: a codec of "
                       "apiary.averaging.compression, or adaptive (by the part's size)")
    state_codec: str | None = Field(None, description="compression of the state rounds' parts (rounds from "
                                    "STATE_ROUNDS up); None: as `codec`")
    download_codec: str = Field("none", description="compression of the state this peer sends to newcomers "
                                "(checksummed after decoding)")
    gather_seconds: float = Field(2.0, gt=0)
    join_seconds: float = Field(3.0, gt=0)
    sender_timeout: float = Field(10.0, gt=0, description="how long a reducer waits for a sender's part")
    round_timeout: float = Field(60.0, gt=0, description="deadline of the all-reduce of one round")
    aggregation: Aggregation = Field(Aggregation.MEAN, description="how a reducer combines parts: mean, "
                                     "centered_clip or trimmed_mean (robust to peers sending outliers)")
    clip_radius: float = Field(1.0, gt=0, description="centered_clip: norm a part's offset from the centre is clipped to")
    clip_iterations: int = Field(20, ge=1, description="centered_clip: most iterations per span")
    trim_fraction: float = Field(0.1, ge=0, lt=0.5, description="trimmed_mean: share of the weight cut from each end")
    verify_reductions: bool = Field(False, description="commit to parts, audit the spans others reduce for us, "
                                    "ban reducers caught lying (apiary.averaging.verification)")
    audit_blocks: int = Field(4, ge=1, description="verification: blocks of 1024 values audited per span")
    rejoin_weight: float = Field(1.0, gt=0, le=1, description="factor on the weight of a round that follows rounds "
                                 "this averager missed: 1 mixes its stale values in fully (gradients); 0.01 all but "
                                 "adopts its group's average (Moshpit parameter averaging)")

    @field_validator("codec", "state_codec", "download_codec")
    @classmethod
    def _known_codec(cls, name: str | None) -> str | None:
        if name is not None:
            codec_selection(name)  # ValueError naming the known ones
        return name

    def codecs(self) -> dict[str, AdaptiveCodec]:
        """The codec selection of each role of round."""
        return {GRADIENTS: codec_selection(self.codec), STATE: codec_selection(self.state_codec or self.codec)}

    def aggregator(self) -> Aggregator:
        return Aggregator(self.aggregation, self.clip_radius, self.clip_iterations, self.trim_fraction)


Group = tuple[str, list[Member]]


@dataclass(frozen=True)
class RoundResult:
    """How one step went, as the averager reports it (`Averager.last_round`, `on_round`)."""

    result: str  # OK, NO_GROUP or FAILED
    group_size: int
    seconds: float
    finished_at: float  # unix time
    error: str = ""
    formed_early: bool = False  # the group was formed ahead of the round (prepare())
    sent_bytes: int = 0  # all-reduce tensor bytes sent since the previous round's result
    received_bytes: int = 0  # and received
    members: tuple[str, ...] = ()  # the group's peer ids, sorted (OK only)


@dataclass
class _EarlyGroup:
    """A group being formed ahead of its round's step, for the schema of that moment."""

    round_index: int
    schema: str
    task: asyncio.Task[Group | None]


class Averager:
    """Averages `tensors` (in place) with peers of the same run. Attach to a server before it starts.

    It dials with `pool`, by default one made like the server it is attached to (same TLS or
    plaintext, same run and credentials); a given pool that disagrees with that server is refused.
    `on_bytes_sent` and `on_bytes_received` are told the tensor bytes of every all-reduce part and
    mean sent and received (its own rounds' and those it reduces for others); `on_round`, every
    step's result."""

    def __init__(self, tensors: Sequence[torch.Tensor], dht: DHTLike, peer_id: str, settings: AveragerSettings,
                 pool: ChannelPool | None = None, *, on_bytes_sent: Callable[[int], None] | None = None,
                 on_bytes_received: Callable[[int], None] | None = None,
                 on_round: Callable[[RoundResult], None] | None = None):
        self.tensors = list(tensors)
        self.dht = dht
        self.peer_id = peer_id
        self.settings = settings
        self.codecs = settings.codecs()  # role of round -> codec selection
        self.pool = pool
        self.bulk_client: BulkClient | None = None  # made at attach() like the pool
        self._own_pool: ChannelPool | None = None  # the pool made at attach(), closed with the averager
        self.reductions = AllReduceService()
        self.grid = MoshpitGrid.for_swarm(settings.expected_peers, settings.target_group_size)
        self.round_index = 0
        self.averaged_round = -1  # the latest round whose all-reduce this averager completed (-1: none)
        self.schema = Schema.of_tensors(self.tensors).digest
        self.matchmaker: Matchmaker | None = None
        self.server: RpcServer | None = None
        self._flat: torch.Tensor | None = None  # buffers reused round after round
        self._averaged: torch.Tensor | None = None
        self._early: _EarlyGroup | None = None
        self._in_step = False
        self.formed_early = False  # the latest step found its group formed ahead (prepare())
        self.verifier: Verifier | None = None  # made at attach() with verify_reductions
        self.last_round: RoundResult | None = None  # of the latest step
        self._members: tuple[str, ...] = ()  # the group of the step in flight, sorted
        self._on_bytes_sent, self._on_bytes_received, self._on_round = on_bytes_sent, on_bytes_received, on_round
        self._sent = self._received = 0  # all-reduce tensor bytes so far
        self._reported = (0, 0)  # and at the latest step's result

    def register(self, tensors: Sequence[torch.Tensor]) -> str:
        """Averages `tensors` from the next step on (a step in flight keeps its own); returns
        their schema digest. Groups are formed anew, for the new schema."""
        self.tensors = list(tensors)
        self.schema = Schema.of_tensors(self.tensors).digest
        self.matchmaker = None
        return self.schema

    def attach(self, server: RpcServer) -> None:
        """Serves matchmaking and reduction on `server` (before it starts; it needs bulk unless client)."""
        if self.settings.mode is not Role.CLIENT:
            if server.bulk is None:
                raise ValueError("an averager in node or aux mode needs the bulk transport")
            server.bulk.add_route(REDUCE_ROUTE, self._reduce, keeps_tensors=False)
            if self.settings.verify_reductions:
                server.bulk.add_route(AUDIT_ROUTE, self.reductions.handle_audit)
                server.bulk.add_route(PART_ROUTE, self.reductions.handle_part)
        if self.settings.verify_reductions:
            self.verifier = Verifier(server.identity, self.settings.audit_blocks, self.settings.sender_timeout)
        if self.pool is None:
            self.pool = self._own_pool = ChannelPool.like(server)
        self.pool.check_matches(server.settings, "the averager")
        # its calls (parts to reducers, audits) count as the averager's traffic
        self.bulk_client = BulkClient(self.pool.settings, identity=self.pool.identity, on_call=self._count,
                                      puncher=self.pool.puncher)  # one memory of punches per pool
        server.add_service(MATCHMAKING, _JoinServicer(self))
        self.server = server

    def _matchmaker(self) -> Matchmaker:
        if self.server is None or self.pool is None:
            raise RuntimeError("attach() the averager to a server first")
        bulk = str(self.server.announced_bulk) if self.settings.mode is not Role.CLIENT else ""
        me = Member(self.peer_id, bulk, self.settings.mode, self.settings.bandwidth)
        if self.matchmaker is not None:  # announcements carry the server's current addresses
            self.matchmaker.me, self.matchmaker.grpc_address = me, str(self.server.announced)
        else:
            self.matchmaker = Matchmaker(
                self.dht, me, str(self.server.announced), self.schema, self.pool,
                MatchmakingSettings(self.settings.target_group_size, self.settings.min_group_size,
                                    self.settings.gather_seconds, self.settings.join_seconds),
                self.settings.prefix,
            )
            if self.verifier is not None:
                self.matchmaker.banned = self.verifier.banned  # leaves out reducers caught lying
        return self.matchmaker

    @property
    def matchmaking_seconds(self) -> float:
        """How long forming a group takes at most: announcing, gathering, joining."""
        return self.settings.gather_seconds + self.settings.join_seconds

    def prepare(self, round_index: int) -> bool:
        """Starts forming the group of round `round_index` now; False while a round runs or a
        group is being formed already (the grid moves after each round: ask again once it ended).
        The round's step() takes the group; a step of another round drops it."""
        if self._in_step or self._early is not None and not self._early.task.done():
            return False
        task = asyncio.create_task(self._form_group(round_index, ""), name=f"apiary-early-group-{round_index}")
        self._early = _EarlyGroup(round_index, self.schema, task)
        return True

    async def step(self, weight: float = 1.0, round: int | None = None, *,
                   tensors: Sequence[torch.Tensor] | None = None) -> int | None:
        """One round: the next one, or `round` (a peer that skipped rounds names the one the swarm
        is at; the next step follows it). Returns the group size, or None if no group formed
        (tensors unchanged). `tensors` (shaped as registered) are averaged in place instead of
        the registered ones. The round's result goes to `last_round` and `on_round`, also when
        the step raises."""
        round_index = self.round_index if round is None else round
        self.round_index = round_index + 1
        started = time.monotonic()
        self._in_step = True
        self._members = ()
        try:
            size = await self._run(round_index, weight, self.tensors if tensors is None else list(tensors))
        except asyncio.CancelledError:
            self._report(FAILED, 0, started, "cancelled (the caller hung up or the averager is stopping)")
            raise
        except Exception as e:
            self._report(FAILED, 0, started, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            raise
        finally:
            self._in_step = False
        self._report(OK if size else NO_GROUP, size or 0, started)
        return size

    def _report(self, result: str, size: int, started: float, error: str = "") -> None:
        (sent, received), self._reported = self._reported, (self._sent, self._received)
        self.last_round = RoundResult(result, size, time.monotonic() - started, time.time(), error, self.formed_early,
                                      self._sent - sent, self._received - received,
                                      self._members if result == OK else ())
        if self._on_round is not None:
            self._on_round(self.last_round)

    async def _reduce(self, call: BulkCall) -> BulkAnswer:
        """The Reduce route: a part from another sender, answered with its span's mean."""
        self._count(0, _payload_bytes(call.tensors))
        answer = await self.reductions.handle(call)
        self._count(_payload_bytes(answer.tensors), 0)
        return answer

    def _count(self, sent: int, received: int) -> None:
        """Tensor bytes of a completed exchange: a call of the bulk client, or a Reduce answered."""
        self._sent += sent
        self._received += received
        if sent and self._on_bytes_sent is not None:
            self._on_bytes_sent(sent)
        if received and self._on_bytes_received is not None:
            self._on_bytes_received(received)

    async def _run(self, round_index: int, weight: float, tensors: list[torch.Tensor]) -> int | None:
        group = await self._group_for(round_index)
        if group is None:
            return None
        await faults.reached_async("averager.round", round_index)
        group_id, members = group
        self._members = tuple(sorted(m.peer_id for m in members))
        position = [m.peer_id for m in members].index(self.peer_id)
        flat = flatten(tensors, out=self._flat) if self.settings.mode is not Role.AUX else torch.zeros(0)
        self._flat = flat
        total = flat.numel() if self.settings.mode is not Role.AUX else sum(t.numel() for t in tensors)
        round_ = GroupRound(group_id, members, position, total, self.settings.sender_timeout, self.settings.aggregator(),
                            verify=self.verifier is not None)
        assert self.bulk_client is not None  # a group was formed: attach() made it
        weight *= self._rejoin_factor(round_index)
        role = STATE if round_index >= STATE_ROUNDS else GRADIENTS
        codec = self.codecs[role].choose(total // len(members))  # by the size of a span, about
        averaged = await run_allreduce(round_, flat, weight, service=self.reductions, client=self.bulk_client,
                                       codec=codec, deadline=self.settings.round_timeout, out=self._averaged,
                                       verifier=self.verifier)
        self._averaged = averaged
        self.averaged_round = round_index
        if self.settings.mode is not Role.AUX:
            unflatten_into(averaged, tensors)
        return len(members)

    def _rejoin_factor(self, round_index: int) -> float:
        """`rejoin_weight` if this averager missed the round before `round_index` (it was absent,
        its group failed, or it joins a running swarm), else 1. A returning peer holds the values
        of rounds ago; mixed in at full weight they re-inject that old deviation into its group,
        which the next rounds must average away again: with 10% of the peers failing per round,
        the simulation (benchmarks/moshpit_churn.py) shows the Moshpit spread after 8 rounds
        fall from 2.3e-3 to 9.4e-5 of the initial one when returning peers adopt their group's
        average (6.2e-3 to 1.0e-3 without short lines pairing up). The factor is never 0, so that a group made only of returning peers
        still averages their values (a group whose weights are all 0 would yield zeros)."""
        return self.settings.rejoin_weight if round_index > self.averaged_round + 1 else 1.0

    async def _group_for(self, round_index: int) -> Group | None:
        """The group formed ahead for this round if there is one, else one formed now (under the
        round's retry key when forming it ahead found no group)."""
        early, self._early = self._early, None
        self.formed_early = False
        suffix = ""
        if early is not None and early.round_index == round_index and early.schema == self.schema:
            try:
                group = await early.task
            except Exception as e:  # noqa: BLE001 - formed again below
                logger.info("forming the group of round %d ahead failed: %s", round_index, e)
                group = None
            if group is not None:
                self.formed_early = True
                return group
            suffix = ".retry"
        elif early is not None:
            await _cancelled(early.task)
        return await self._form_group(round_index, suffix)

    async def _form_group(self, round_index: int, suffix: str) -> Group | None:
        matchmaker = self._matchmaker()
        ranking = self.grid.ranks_in(round_index)
        matchmaker.line_of = (lambda rank: self.grid.line_of(round_index, rank)) if ranking else None
        gather_seconds = self.settings.gather_seconds
        if not ranking and not self.grid.settled:
            gather_seconds -= await self._join_least_crowded_line(round_index, suffix)
        matchmaker.place = self.grid.place(round_index)
        every_line = [] if ranking else self.grid.lines(round_index, self.grid.side ** (self.grid.dims - 1))
        matchmaker.round_lines = [self._group_key(round_index, suffix, line) for line in every_line]
        group = await matchmaker.form_group(self._group_key(round_index, suffix), gather_seconds)
        if ranking and matchmaker.last_rank is not None:
            self.grid.settle_at(matchmaker.last_rank)
        elif not ranking:
            self.grid.settle_line(round_index, matchmaker.line_places, self.peer_id)
        if matchmaker.left_out:
            self.grid.step_aside(round_index)
        return group

    async def _join_least_crowded_line(self, round_index: int, suffix: str) -> float:
        """A newcomer to an established grid: once the others have announced (half the gathering
        window), probes a few lines of the round and moves to the one with the fewest peers, where
        the places of the missing ones are free. Returns the seconds of the window it spent."""
        started = asyncio.get_running_loop().time()
        await asyncio.sleep(self.settings.gather_seconds / 2)
        lines = self.grid.lines(round_index, self.grid.side)
        counts = await self._matchmaker().count([self._group_key(round_index, suffix, line) for line in lines])
        self.grid.coords = lines[counts.index(min(counts))]
        return min(asyncio.get_running_loop().time() - started, self.settings.gather_seconds)

    def _group_key(self, round_index: int, suffix: str, coords: list[int] | None = None) -> str:
        return f"{self.grid.key(round_index, coords)}.r{round_index}{suffix}"

    async def close(self) -> None:
        if self._early is not None:
            await _cancelled(self._early.task)
            self._early = None
        if self.bulk_client is not None:
            await self.bulk_client.close()
        if self._own_pool is not None:
            await self._own_pool.close()


def _payload_bytes(tensors: Sequence[tuple[TensorHeader, object]]) -> int:
    return sum(header.nbytes for header, _ in tensors)


async def _cancelled(task: asyncio.Task[Group | None]) -> None:
    """Cancels `task` and waits until it has cleaned up (its outcome is of no interest)."""
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()


class _JoinServicer:
    def __init__(self, averager: Averager):
        self.averager = averager

    async def join(self, request: JoinRequest, context: CallContext) -> JoinReply:
        return await self.averager._matchmaker().join(request, context)

"""Finding a group to average with, through the DHT, with no master and no deadlock.

Every peer that wants to average announces itself under the round's group key (a DHT
dictionary: one subkey per peer) and, after the gathering window, reads everyone's
announcements. Peers with another tensor schema are left out. The announcers, sorted by peer
id, are cut into chunks of the target group size; each chunk's leader is its lowest-id member
that can be dialled (not in client mode). Followers call their leader's `Join` once; the
leader answers every joiner with the same settled member list when all of its chunk have
joined or the join window closes. On a Moshpit grid, a line with fewer announcers than the
target size reads the round's other lines and forms one group with another short line
(`short_partner`), under both keys joined. Leaders never call anyone and followers call only their
leader, so no two peers can wait on each other.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from collections.abc import Callable, Container, Hashable, Mapping
from typing import Any

from apiary.averaging.protos.averaging_pb2 import JoinReply, JoinRequest, MemberInfo
from apiary.averaging.spans import Member, Role
from apiary.dht.interface import DHTLike
from apiary.wire import CallContext, ChannelPool, Endpoint, Method, RpcClient, ServiceSpec, WireError

logger = logging.getLogger(__name__)

MATCHMAKING = ServiceSpec("apiary.averaging.Matchmaking", (Method("Join", JoinRequest, JoinReply),))


@dataclass(frozen=True)
class MatchmakingSettings:
    target_group_size: int = 16
    min_group_size: int = 2
    gather_seconds: float = 2.0  # how long announcements are collected before reading them
    join_seconds: float = 3.0  # how long a leader waits for its chunk to join


class _Gathering:
    """A leader's view of one forming group."""

    def __init__(self, group_key: str, leader: Member, expected: set[str], capacity: int, schema: str):
        self.group_key = group_key
        self.members: dict[str, Member] = {leader.peer_id: leader}
        self.expected = expected
        self.capacity = capacity
        self.schema = schema
        self.settled = asyncio.Event()
        self.group_id = f"{group_key}:{uuid.uuid4().hex[:12]}"

    def admit(self, member: Member, schema: str) -> str | None:
        """Admits a joiner; returns the reason if refused."""
        if self.settled.is_set():
            return "the group is already settled"
        if schema != self.schema:
            return f"tensor schema {schema} differs from the group's {self.schema}"
        if len(self.members) >= self.capacity and member.peer_id not in self.members:
            return "the group is full"
        self.members[member.peer_id] = member
        if self.expected <= set(self.members):
            self.settled.set()
        return None


class Matchmaker:
    """Forms groups for one averager: announce, read, then lead or join."""

    def __init__(
        self,
        dht: DHTLike,
        me: Member,
        grpc_address: str,
        schema: str,
        pool: ChannelPool,
        settings: MatchmakingSettings,
        prefix: str,
    ):
        self.dht = dht
        self.me = me
        self.grpc_address = grpc_address
        self.schema = schema
        self.pool = pool
        self.settings = settings
        self.prefix = prefix
        # Set for a round that places peers by rank: maps a rank to its line; peers on our line
        # form our group. `last_rank` is our rank among the peers that round saw.
        self.line_of: Callable[[int], Hashable] | None = None
        self.last_rank: int | None = None
        # Our place on the grid line we announce under (None: none yet); after a round,
        # `line_places` holds the places every peer seen there announced, and `left_out` whether
        # we had no one to form a group with (alone, or the odd one out of the cut).
        self.place: int | None = None
        self.line_places: dict[str, int | None] = {}
        self.left_out = False
        # The group keys of every line of this round (ours among them), when there are others:
        # a line short of the target size then averages together with another short one.
        self.round_lines: list[str] = []
        self._gathering: _Gathering | None = None
        self._leading = asyncio.Event()  # set while a gathering is open
        self.banned: Container[str] = ()  # peers left out of every group (reducers caught lying)

    async def form_group(self, group_key: str, gather_seconds: float | None = None) -> tuple[str, list[Member]] | None:
        """The group (id and members sorted by peer id) for this round, or None if none formed.
        `gather_seconds`: how long to gather announcements, when part of the window has passed."""
        key = self._key(group_key)
        window = self.settings.gather_seconds + self.settings.join_seconds
        announcement = {"address": self.grpc_address, "bulk": self.me.bulk_address, "mode": self.me.role.value,
                        "bandwidth": self.me.bandwidth, "schema": self.schema, "place": self.place}
        self.line_places, self.left_out = {self.me.peer_id: self.place}, True
        await self.dht.store(key, announcement, time.time() + window + 5, subkey=self.me.peer_id)
        await asyncio.sleep(self.settings.gather_seconds if gather_seconds is None else gather_seconds)
        found = await self.dht.get(key, latest=True)
        peers = self._compatible(found.value if found is not None else {})
        self.line_places = {peer: _place(value.get("place")) for peer, value in peers.items()}
        target = self.settings.target_group_size
        if len(peers) < target and len(self.round_lines) > 1:
            partner = await self._short_partner(group_key, len(peers))
            if partner is not None:
                group_key, other = partner
                peers = {**other, **peers}
                target *= 2
        ordered = sorted(peers)
        self.last_rank = ordered.index(self.me.peer_id)
        chunk = my_group(ordered, self.me.peer_id, target, self.line_of)
        self.left_out = len(chunk) < self.settings.min_group_size
        if self.left_out:
            return None
        dialable = [peer for peer in chunk if peers[peer]["mode"] != Role.CLIENT.value]
        if not dialable:
            return None
        leader = dialable[0]
        if leader == self.me.peer_id:
            return await self._lead(group_key, set(chunk))
        return await self._join(group_key, peers[leader]["address"], leader)

    async def count(self, group_keys: list[str]) -> list[int]:
        """How many peers of our schema have announced under each of `group_keys` so far."""
        found = await asyncio.gather(*(self.dht.get(self._key(key), latest=True) for key in group_keys))
        return [sum(peer != self.me.peer_id for peer in self._compatible(item.value if item is not None else {}))
                for item in found]

    async def _short_partner(self, group_key: str, ours: int) -> tuple[str, dict[str, dict[str, Any]]] | None:
        """For a line short of the target size: the key of the group it forms with its partner
        line (`short_partner`) and that line's announcers, or None if it has no partner."""
        others = [key for key in self.round_lines if key != group_key]
        found = await asyncio.gather(*(self.dht.get(self._key(key), latest=True) for key in others))
        announcers = {key: {peer: value for peer, value in self._compatible(item.value if item is not None else {}).items()
                            if peer != self.me.peer_id}
                      for key, item in zip(others, found)}
        counts = {key: len(peers) for key, peers in announcers.items()} | {group_key: ours}
        partner = short_partner(counts, group_key, self.settings.target_group_size)
        if partner is None:
            return None
        return "+".join(sorted((group_key, partner))), announcers[partner]

    def _key(self, group_key: str) -> str:
        return f"{self.prefix}.groups.{group_key}"

    def _compatible(self, entries: dict[Any, Any]) -> dict[str, dict[str, Any]]:
        peers = {}
        for peer_id, item in entries.items():
            value = getattr(item, "value", None)
            if not isinstance(value, dict) or not isinstance(peer_id, str) or peer_id in self.banned:
                continue
            if value.get("schema") != self.schema:
                logger.warning("peer %s averages another tensor schema (%s); leaving it out", peer_id[:8], value.get("schema"))
                continue
            peers[peer_id] = value
        peers.setdefault(self.me.peer_id, {"address": self.grpc_address, "mode": self.me.role.value,
                                           "place": self.place})
        return peers

    async def _lead(self, group_key: str, expected: set[str]) -> tuple[str, list[Member]] | None:
        capacity = max(self.settings.target_group_size, len(expected))  # two short lines: more than the target
        gathering = _Gathering(group_key, self.me, expected, capacity, self.schema)
        self._gathering = gathering
        self._leading.set()
        try:
            async with asyncio.timeout(self.settings.join_seconds):
                await gathering.settled.wait()
        except asyncio.TimeoutError:
            pass
        finally:
            gathering.settled.set()  # answers every waiting joiner
            self._gathering = None
            self._leading.clear()
        if len(gathering.members) < self.settings.min_group_size:
            return None
        return gathering.group_id, sorted(gathering.members.values(), key=lambda m: m.peer_id)

    async def _join(self, group_key: str, leader_address: str, leader: str) -> tuple[str, list[Member]] | None:
        client = RpcClient(self.pool, MATCHMAKING, Endpoint.parse(leader_address),
                           timeout=self.settings.join_seconds + 5, peer_id=leader)
        request = JoinRequest(group_key=group_key, member=self._info(self.me), schema=self.schema)
        try:
            reply = await client.call("Join", request)
        except WireError as e:
            logger.info("leader at %s did not take us in: %s", leader_address, e)
            return None
        if not reply.accepted:
            logger.info("leader at %s refused: %s", leader_address, reply.reason)
            return None
        return reply.group_id, [_member(info) for info in reply.members]

    def _info(self, member: Member) -> MemberInfo:
        return MemberInfo(peer_id=member.peer_id, bulk_address=member.bulk_address, mode=member.role.value,
                          bandwidth=member.bandwidth)

    async def join(self, request: JoinRequest, context: CallContext) -> JoinReply:
        """The leader's side of `Join`: returns once the group is settled. A joiner that comes
        before this peer has read the announcements waits for it (up to the join window)."""
        try:
            async with asyncio.timeout(self.settings.join_seconds):
                await self._leading.wait()
        except asyncio.TimeoutError:
            pass
        gathering = self._gathering
        if gathering is None or gathering.group_key != request.group_key:
            return JoinReply(accepted=False, reason="not leading a group for this key now")
        try:
            member = _member(request.member)
        except ValueError as e:
            return JoinReply(accepted=False, reason=str(e))
        if member.peer_id in self.banned:
            return JoinReply(accepted=False, reason="banned from this run's groups: caught lying as a reducer")
        refusal = gathering.admit(member, request.schema)
        if refusal is not None:
            return JoinReply(accepted=False, reason=refusal)
        await gathering.settled.wait()
        if member.peer_id not in gathering.members or len(gathering.members) < self.settings.min_group_size:
            return JoinReply(accepted=False, reason="the group did not form")
        members = sorted(gathering.members.values(), key=lambda m: m.peer_id)
        return JoinReply(accepted=True, group_id=gathering.group_id, members=[self._info(m) for m in members])


def my_group(ordered: list[str], me: str, target_size: int,
             line_of: Callable[[int], Hashable] | None = None) -> list[str]:
    """The peers (`ordered` by peer id, `me` among them) that `me` forms a group with: those on
    its line when `line_of` maps ranks to lines, else its chunk when the peers are cut into
    groups of at most `target_size` (interleaved, so chunk sizes differ by at most one)."""
    rank = ordered.index(me)
    if line_of is not None:
        mine = line_of(rank)
        return [peer for index, peer in enumerate(ordered) if line_of(index) == mine]
    count = -(-len(ordered) // target_size)  # groups needed
    return ordered[rank % count::count]


def short_partner(counts: Mapping[str, int], mine: str, target_size: int) -> str | None:
    """The line that line `mine` averages with this round, given how many peers announced under
    each line of the round (`counts`, by group key), or None. The lines short of the target size
    (but not empty) pair up in key order: a line with a missing member averages without that
    member's value, and the next round spreads that gap at about a third of its deviation (with
    groups of four); two short lines averaging together halve the gap and mix across lines
    (by simulation, at 10% failures per round and returning peers adopting, the spread after 8
    rounds falls from 1.0e-3 to 9.4e-5 of the initial one; benchmarks/moshpit_churn.py). Every
    peer of both lines computes the same pairs from the same announcements; a peer that read
    other counts (an announcement landing in between) fails to join and sits the round out."""
    return short_pairs(counts, target_size).get(mine)


def short_pairs(counts: Mapping[str, int], target_size: int) -> dict[str, str]:
    """Every line's partner by `short_partner`'s rule (both ways), in one pass over the lines."""
    short = sorted(key for key, count in counts.items() if 0 < count < target_size)
    pairs = {}
    for first, second in zip(short[0::2], short[1::2]):  # 0 <-> 1, 2 <-> 3, ...
        pairs[first], pairs[second] = second, first
    return pairs


def _place(value: Any) -> int | None:
    """An announced grid place: a non-negative int, else none (malformed announcements claim nothing)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _member(info: MemberInfo) -> Member:
    try:
        role = Role(info.mode)
    except ValueError:
        raise ValueError(f"unknown averaging role {info.mode!r}") from None
    if not info.peer_id:
        raise ValueError("member without a peer id")
    if role is not Role.CLIENT and not info.bulk_address:
        raise ValueError(f"a {role.value} member needs a bulk address")
    return Member(info.peer_id, info.bulk_address, role, info.bandwidth)

"""State transfer: how a newcomer gets the swarm's latest state from a peer that has it.

Donors keep their latest state (tensors plus metadata such as the epoch), serve it over the
bulk route `STATE_ROUTE`, and announce themselves in the DHT under `<prefix>.state_donors`
(one subkey per donor, with its epoch and free capacity). `download_state` asks the donors
newest epoch first, checks each answer against its SHA-256, falls back to the next donor when
one fails, is busy or sends corrupted bytes, and gives up with a clear error after a bounded
time. Newcomers spread over the donors: among those of the newest epoch each picks at random,
weighted by the free capacity they announce; a donor serving `max_downloads` downloads at once
refuses more with `Busy`.

A donor with a download codec (a codec setting of `compression.selection`, e.g. float16 or
adaptive) sends each floating tensor encoded by the codec chosen for its size (others, and any
that codec refuses, as they are) and says how in `StateReply.packing`; the SHA-256 then covers
the tensors as decoded, which the newcomer checks after decoding.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import torch

from apiary.averaging.compression import AdaptiveCodec, codec_by_name
from apiary.averaging.compression.selection import codec_selection
from apiary.dht.interface import DHTLike
from apiary.files import write_atomically
from apiary.averaging.protos.averaging_pb2 import PackedTensor, StateReply, StateRequest
from apiary.wire import Busy, Endpoint, InvalidRequest, NotFoundHere, OverLimit, WireError
from apiary.wire.bulk import BulkAnswer, BulkCall, BulkClient
from apiary.wire.protos.wire_pb2 import TensorHeader
from apiary.wire.rpc import decode
from apiary.wire.tensors import tensor_from_payload, tensor_payload

logger = logging.getLogger(__name__)

STATE_ROUTE = "apiary.averaging/State"


class StateTransferError(RuntimeError):
    """No donor provided a valid state in time."""


@dataclass(frozen=True)
class State:
    metadata: dict[str, Any]
    tensors: list[torch.Tensor]

    @property
    def epoch(self) -> int:
        return int(self.metadata.get("epoch", 0))


def state_digest(metadata: bytes, payloads: Sequence[tuple[TensorHeader, Any]]) -> bytes:
    digest = hashlib.sha256(metadata)
    for header, payload in payloads:
        digest.update(header.SerializeToString(deterministic=True))
        digest.update(payload)
    return digest.digest()


Payload = tuple[TensorHeader, Any]


def pack_tensors(tensors: Sequence[torch.Tensor],
                 selection: AdaptiveCodec) -> tuple[list[Payload], list[PackedTensor], list[torch.Tensor]]:
    """(wire payloads, packing, the tensors as a receiver decodes them) of `tensors`, each
    floating one encoded by the codec `selection` picks for its size."""
    payloads: list[Payload] = []
    packing: list[PackedTensor] = []
    decoded: list[torch.Tensor] = []
    for tensor in tensors:
        dtype, shape = str(tensor.dtype).removeprefix("torch."), list(tensor.shape)
        encoded: list[torch.Tensor] | None = None
        if tensor.is_floating_point() and tensor.numel():
            codec = selection.choose(tensor.numel())
            try:
                encoded = codec.encode(tensor.reshape(-1))
            except ValueError:  # inf or NaN: sent as it is
                encoded = None
        if encoded is None:
            payloads.append(tensor_payload(tensor))
            packing.append(PackedTensor(codec="", count=1, dtype=dtype, shape=shape))
            decoded.append(tensor)
            continue
        payloads += [tensor_payload(t) for t in encoded]
        packing.append(PackedTensor(codec=codec.name, count=len(encoded), dtype=dtype, shape=shape))
        decoded.append(codec.decode(encoded, tensor.numel()).to(tensor.dtype).view(tensor.shape))
    return payloads, packing, decoded


def unpack_tensors(payloads: Sequence[Payload], packing: Sequence[PackedTensor]) -> list[torch.Tensor]:
    """The state tensors that `payloads` carry as `packing` says (none: one payload each, as is);
    ValueError for anything inconsistent."""
    if not packing:
        return [tensor_from_payload(header, payload) for header, payload in payloads]
    tensors: list[torch.Tensor] = []
    position = 0
    for packed in packing:
        if packed.count < 1 or position + packed.count > len(payloads) or (not packed.codec and packed.count != 1):
            raise ValueError("the state's packing does not match its tensors")
        wire = [tensor_from_payload(h, p) for h, p in payloads[position : position + packed.count]]
        position += packed.count
        if not packed.codec:
            tensors.append(wire[0])
            continue
        dtype = getattr(torch, packed.dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or any(d < 0 for d in packed.shape):
            raise ValueError(f"a packed state tensor has dtype {packed.dtype!r} and shape {list(packed.shape)}")
        values = codec_by_name(packed.codec).decode(wire, math.prod(packed.shape))
        tensors.append(values.to(dtype).view(tuple(packed.shape)))
    if position != len(payloads):
        raise ValueError("the state's packing does not match its tensors")
    return tensors


def donors_key(prefix: str) -> str:
    return f"{prefix}.state_donors"


class StateDonor:
    """Holds the latest state and serves it, compressed by `codec` (a codec setting; none: as
    it is), to at most `max_downloads` newcomers at once; `announce()` keeps it listed in the
    DHT. `downloads` counts the states sent."""

    def __init__(self, prefix: str, peer_id: str, bulk_address: str = "", codec: str = "none",
                 max_downloads: int = 4):
        if max_downloads < 1:
            raise ValueError(f"max_downloads={max_downloads} must be at least 1")
        self.prefix = prefix
        self.peer_id = peer_id
        self.bulk_address = bulk_address
        self.max_downloads = max_downloads
        self.downloads = 0
        self._serving = 0
        self._selection = None if codec == "none" else codec_selection(codec)
        self._state: State | None = None
        self._packed: tuple[list[Payload], list[PackedTensor], bytes] | None = None  # of the state, made once

    def update(self, state: State) -> None:
        """Replaces the state served (tensors are copied, so the caller may keep training)."""
        self._state = State(dict(state.metadata), [t.detach().to("cpu", copy=True) for t in state.tensors])
        self._packed = None

    @property
    def state(self) -> State | None:
        return self._state

    async def announce(self, dht: DHTLike, ttl: float) -> bool:
        if self._state is None or not self.bulk_address:
            return False
        value = {"bulk": self.bulk_address, "epoch": self._state.epoch, "free": self.max_downloads - self._serving}
        return await dht.store(donors_key(self.prefix), value, time.time() + ttl, subkey=self.peer_id)

    async def handle(self, call: BulkCall) -> BulkAnswer:
        request = decode(StateRequest, call.body)  # InvalidRequest if malformed
        if request.prefix != self.prefix:
            raise NotFoundHere(f"this peer holds the state of run {self.prefix!r}, not {request.prefix!r}")
        state = self._state
        if state is None:
            raise NotFoundHere("this peer has no state to give yet")
        if self._serving >= self.max_downloads:
            raise Busy(f"this donor serves its limit of {self.max_downloads} downloads at once; try another")
        metadata = msgpack.packb(state.metadata, use_bin_type=True)
        if self._selection is None:
            payloads = [tensor_payload(t) for t in state.tensors]
            reply = StateReply(metadata=metadata, epoch=state.epoch, sha256=state_digest(metadata, payloads))
        else:
            if self._packed is None:
                packed, packing, decoded = pack_tensors(state.tensors, self._selection)
                self._packed = packed, packing, state_digest(metadata, [tensor_payload(t) for t in decoded])
            payloads, packing, digest = self._packed
            reply = StateReply(metadata=metadata, epoch=state.epoch, sha256=digest, packing=packing)
        self._serving += 1
        return BulkAnswer(reply.SerializeToString(), payloads, on_sent=self._sent)

    def _sent(self) -> None:
        self._serving -= 1
        self.downloads += 1


async def download_state(
    dht: DHTLike, prefix: str, client: BulkClient, *, timeout: float = 60.0, exclude: Sequence[str] = (),
    rng: random.Random | None = None,
) -> State:
    """The newest valid state among the announced donors; raises StateTransferError after `timeout`.
    Donors that were busy are asked again after a pause (doubling, with jitter) until then."""
    deadline = time.monotonic() + timeout
    rng = rng or random.Random()
    tried: list[str] = []
    found = await dht.get(donors_key(prefix), latest=True)
    entries = found.value if found is not None and isinstance(found.value, dict) else {}
    donors = donor_order(
        {peer: item.value for peer, item in entries.items() if peer not in exclude and isinstance(item.value, dict)}, rng
    )
    pause = 0.2
    while donors and time.monotonic() < deadline:
        busy = []
        for peer_id, info in donors:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                return await _download_from(client, Endpoint.parse(info["bulk"]), prefix, remaining, peer_id)
            except OverLimit as e:  # busy (Busy, or the bulk server's own limits): asked again later
                logger.info("state donor %s is busy: %s; trying the next donor", peer_id[:8], e)
                busy.append((peer_id, info))
                tried.append(f"{peer_id[:8]} (busy: {e})")
            except (WireError, InvalidRequest, ValueError, KeyError, TypeError) as e:  # InvalidRequest: a malformed reply
                logger.warning("state from %s failed: %s; trying the next donor", peer_id[:8], e)
                tried.append(f"{peer_id[:8]} ({e})")
        donors = busy
        if donors:
            await asyncio.sleep(max(0.0, min(pause * (1 + rng.random()), deadline - time.monotonic())))
            pause *= 2
    detail = "; ".join(tried) if tried else "no donor is announced"
    raise StateTransferError(f"could not download the state of run {prefix!r} within {timeout:.0f}s: {detail}")


def donor_order(donors: dict[str, dict[str, Any]], rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    """The order to ask donors in: newest epoch first; within an epoch, a random order weighted
    by the free capacity each announces (none announced: weight 1; none free: asked last), so
    that newcomers spread over donors instead of all asking the same one."""
    def rank(donor: tuple[str, dict[str, Any]]) -> tuple[int, float]:
        free = donor[1].get("free", 1)
        weight = max(float(free), 0.0) if isinstance(free, (int, float)) and math.isfinite(free) else 1.0
        # weighted random order (Efraimidis and Spirakis): sort by u ** (1 / weight), largest first
        key = rng.random() ** (1.0 / weight) if weight > 0 else -rng.random()
        return -int(donor[1].get("epoch", 0)), -key
    return sorted(donors.items(), key=rank)


async def _download_from(client: BulkClient, endpoint: Endpoint, prefix: str, timeout: float, peer_id: str) -> State:
    body, payloads = await client.call(endpoint, STATE_ROUTE, body=StateRequest(prefix=prefix).SerializeToString(),
                                       timeout=timeout, peer_id=peer_id)
    reply = decode(StateReply, body)
    tensors = unpack_tensors(payloads, reply.packing)
    checked = [tensor_payload(t) for t in tensors] if reply.packing else payloads  # decoded, or as received
    if state_digest(reply.metadata, checked) != reply.sha256:
        raise ValueError("the state's checksum does not match: the transfer was corrupted")
    metadata = msgpack.unpackb(reply.metadata, raw=False)
    if not isinstance(metadata, dict):
        raise ValueError("the state's metadata is not a mapping")
    return State(metadata, tensors)


def save_state(state: State, path: str | os.PathLike[str]) -> None:
    """Writes `state` to `path` atomically (a crash leaves the previous file intact)."""
    write_atomically(path, lambda f: torch.save({"metadata": state.metadata, "tensors": state.tensors}, f))


def load_saved_state(path: str | os.PathLike[str]) -> State | None:
    """The state saved at `path` by `save_state`, or None if there is none."""
    if not Path(path).exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return State(dict(saved["metadata"]), list(saved["tensors"]))

"""Sending a pass through many remote experts: one call per server, and what to do when some fail.

The samples routed to each expert are gathered into one request; the requests for the experts
of one server travel in one ForwardMany / BackwardMany call. The caller waits until every
sample has `k_min` answering experts (or every call ended), then at most
`timeout_after_k_min` more for the rest, and never longer than the pass's timeout; calls still
running then are cancelled and their experts count as failed. `ExpertPass` is the autograd
function: its forward returns every (sample, slot) output with a mask of those that answered,
its backward sends the output gradients to the experts that answered and sums the input
gradients they return (failed ones contribute none). Each expert's samples travel in its wire
dtype (`apiary.moe.wire_dtypes`: its schema's compute dtype once it has answered, or the dtype
the layer forces); the outputs and gradients come back in the caller's dtype.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from apiary.moe.bans import ServerBans, server_bans
from apiary.moe.beam_search import ExpertChoice
from apiary.moe.client import run_sync
from apiary.moe.protos.moe_pb2 import ExpertCalls, ExpertRequest, ExpertResults, InfoRequest
from apiary.moe.server import EXPERTS_SERVICE
from apiary.moe.wire_dtypes import WireDtypes, wire_dtypes
from apiary.wire import ChannelPool, InvalidRequest, PayloadTooLarge, PeerAddress, RpcClient, WireError
from apiary.wire.tensors import deserialize_tensor, serialize_tensor

logger = logging.getLogger(__name__)

MAX_ERRORS_SHOWN = 3
MAX_REPLY_TENSOR_BYTES = 1 << 30


class ExpertsUnavailable(RuntimeError):
    """Too few experts answered for some samples (fewer than k_min, and zero outputs not allowed)."""


@dataclass(frozen=True)
class FaultTolerance:
    """How a pass treats slow and failed experts.

    - `k_min`: answers each sample waits for; a sample left with fewer is an error unless
      `allow_zero_outputs` (then it mixes those that answered, or outputs zeros);
    - `forward_timeout` / `backward_timeout`: the longest a pass waits, in seconds;
    - `timeout_after_k_min`: once every sample has k_min answers, how much longer to wait for the rest.
    """

    k_min: int = 1
    forward_timeout: float = 30.0
    backward_timeout: float = 30.0
    timeout_after_k_min: float = 1.0
    allow_zero_outputs: bool = False

    def __post_init__(self) -> None:
        if self.k_min < 0:
            raise ValueError(f"k_min must be non-negative, got {self.k_min}")
        for name in ("forward_timeout", "backward_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.timeout_after_k_min < 0:
            raise ValueError(f"timeout_after_k_min must be non-negative, got {self.timeout_after_k_min}")


@dataclass
class Traffic:
    """Bytes of the serialized ForwardMany/BackwardMany requests sent and replies received."""

    sent: int = 0
    received: int = 0


@dataclass
class Routing:
    """Which samples go to which expert: `experts[e]` gets the samples `samples[e]`, whose outputs
    fill column `slots[e]` of the [batch, k] result; `pool` dials their servers (on `background_loop()`),
    `bans` skips those that failed recently (`apiary.moe.bans`). Tensors travel in `wire_dtype`,
    or (None) in each expert's dtype as `dtypes` learnt it; `traffic` counts the bytes."""

    batch: int
    k: int
    pool: ChannelPool
    experts: list[ExpertChoice] = field(default_factory=list)
    samples: list[torch.Tensor] = field(default_factory=list)
    slots: list[torch.Tensor] = field(default_factory=list)
    bans: ServerBans = field(default_factory=server_bans)
    dtypes: WireDtypes = field(default_factory=wire_dtypes)
    wire_dtype: torch.dtype | None = None
    traffic: Traffic = field(default_factory=Traffic)

    @classmethod
    def of(cls, choices: Sequence[Sequence[ExpertChoice]], k: int, pool: ChannelPool,
           bans: ServerBans | None = None, *, dtypes: WireDtypes | None = None, wire_dtype: torch.dtype | None = None,
           traffic: Traffic | None = None) -> Routing:
        by_expert: dict[tuple[str, str], tuple[ExpertChoice, list[int], list[int]]] = {}
        for sample, chosen in enumerate(choices):
            for slot, choice in enumerate(chosen[:k]):
                entry = by_expert.setdefault((choice.address, choice.name), (choice, [], []))
                entry[1].append(sample)
                entry[2].append(slot)
        routing = cls(len(choices), k, pool, bans=bans if bans is not None else server_bans(),
                      dtypes=dtypes if dtypes is not None else wire_dtypes(), wire_dtype=wire_dtype,
                      traffic=traffic if traffic is not None else Traffic())
        for choice, samples, slots in by_expert.values():
            routing.experts.append(choice)
            routing.samples.append(torch.tensor(samples, dtype=torch.long))
            routing.slots.append(torch.tensor(slots, dtype=torch.long))
        return routing

    def dtype_of(self, e: int) -> torch.dtype:
        """The dtype expert e's tensors travel in now."""
        expert = self.experts[e]
        return self.wire_dtype if self.wire_dtype is not None else self.dtypes.get(expert.address, expert.name)

    def wanted(self, k_min: int) -> torch.Tensor:
        """Answers each sample waits for: k_min, or fewer where fewer experts were found."""
        found = torch.zeros(self.batch, dtype=torch.long)
        for samples in self.samples:
            found.index_add_(0, samples, torch.ones_like(samples))
        return found.clamp(max=k_min)


async def call_experts(method: str, routing: Routing, tensors: Sequence[Sequence[torch.Tensor] | None],
                       settings: FaultTolerance, timeout: float, *, keep_activations: bool = False,
                       handles: Sequence[bytes] = ()) -> tuple[list[list[torch.Tensor] | None], list[str], list[bytes]]:
    """Calls `method` (ForwardMany or BackwardMany) with `tensors[e]` for expert e (None: skip it);
    one call per server, but none to a banned server. Returns each expert's result tensors
    (None: failed, skipped or too late), the errors seen, and each expert's activation handle
    (ForwardMany with `keep_activations`; a BackwardMany sends them back as `handles`). How each
    call ends goes to `routing.bans`; a server still silent at the cut-off is probed."""
    results: list[list[torch.Tensor] | None] = [None] * len(routing.experts)
    kept: list[bytes] = [b""] * len(routing.experts)
    errors: list[str] = []
    by_server: dict[str, list[int]] = defaultdict(list)
    for e, expert in enumerate(routing.experts):
        if tensors[e] is not None:
            by_server[expert.address].append(e)
    wanted = routing.wanted(settings.k_min)
    answered = torch.zeros(routing.batch, dtype=torch.long)
    pool = routing.pool
    tasks: dict[asyncio.Task[ExpertResults], tuple[str, list[int]]] = {}
    clients: dict[str, RpcClient] = {}
    for address, indices in by_server.items():
        if routing.bans.banned(address):
            errors.append(f"{len(indices)} experts on {address}: skipped, the server failed recently")
            continue
        request = ExpertCalls(calls=[
            ExpertRequest(expert=routing.experts[e].name,
                          tensors=[serialize_tensor(t) for t in tensors[e]],  # type: ignore[union-attr]
                          keep_activations=keep_activations, handle=handles[e] if handles else b"")
            for e in indices
        ])
        try:
            peer = PeerAddress.parse(address)  # peer_id@host:port, as an expert server declares it
            client = RpcClient(pool, EXPERTS_SERVICE, peer.endpoint, timeout=timeout, peer_id=peer.peer_id)
        except ValueError as e:
            errors.append(f"{address}: {e}")
            continue
        clients[address] = client
        routing.traffic.sent += request.ByteSize()
        tasks[asyncio.ensure_future(client.call(method, request, timeout=timeout))] = (address, indices)
    started = time.monotonic()
    k_min_reached: float | None = None
    pending = set(tasks)
    try:
        while pending:
            until = started + timeout
            if k_min_reached is not None:
                until = min(until, k_min_reached + settings.timeout_after_k_min)
            done, pending = await asyncio.wait(pending, timeout=max(0.0, until - time.monotonic()),
                                               return_when=asyncio.FIRST_COMPLETED)
            if not done:
                break
            for task in done:
                address, indices = tasks[task]
                for e in _collect(task, address, indices, routing, results, errors, kept):
                    answered.index_add_(0, routing.samples[e], torch.ones_like(routing.samples[e]))
            if k_min_reached is None and bool((answered >= wanted).all()):
                k_min_reached = time.monotonic()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    for task in pending:
        address, indices = tasks[task]
        errors.append(f"{len(indices)} experts on {address}: no answer in time")
        info = InfoRequest(expert=routing.experts[indices[0]].name)
        routing.bans.probe(address, partial(clients[address].call, "Info", info, timeout=timeout))
    return results, errors, kept


def _collect(task: asyncio.Task[ExpertResults], address: str, indices: list[int], routing: Routing,
             results: list[list[torch.Tensor] | None], errors: list[str], kept: list[bytes]) -> list[int]:
    """Stores the results of one server's call; returns the experts that answered."""
    try:
        reply = task.result()
    except WireError as e:
        errors.append(str(e))
        routing.bans.outcome(address, e)
        return []
    routing.bans.outcome(address, None)
    routing.traffic.received += reply.ByteSize()
    if len(reply.results) != len(indices):
        errors.append(f"{address} answered {len(reply.results)} results for {len(indices)} experts")
        return []
    ok = []
    for e, result in zip(indices, reply.results):
        name = routing.experts[e].name
        if result.code:
            errors.append(f"expert {name!r} on {address}: {result.code}: {result.error}")
            continue
        try:
            results[e] = [deserialize_tensor(t, MAX_REPLY_TENSOR_BYTES) for t in result.tensors]
        except (InvalidRequest, PayloadTooLarge) as error:  # what deserialize_tensor refuses
            errors.append(f"expert {name!r} on {address} answered a malformed tensor: {error}")
            continue
        kept[e] = result.handle
        routing.dtypes.learn(address, name, result.dtype)
        ok.append(e)
    return ok


# Passed to every ExpertPass so that its backward runs (and trains the experts) even when the
# layer's input needs no gradient, e.g. a mixture right after the data.
ALWAYS_BACKWARD = torch.empty(0, requires_grad=True)


class ExpertPass(torch.autograd.Function):
    """apply(ALWAYS_BACKWARD, routing, settings, keep_activations, x) → (outputs [batch, k, *x.shape[1:]],
    answered mask [batch, k]). `keep_activations`: ask the servers to keep them for the backward."""

    @staticmethod
    def forward(ctx: Any, always: torch.Tensor, routing: Routing, settings: FaultTolerance,  # type: ignore[override]
                keep_activations: bool, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtypes = [routing.dtype_of(e) for e in range(len(routing.experts))]
        x_cpu = x.detach().cpu()
        inputs = [[x_cpu[samples].to(dtype)] for samples, dtype in zip(routing.samples, dtypes)]
        results, errors, handles = run_sync(
            call_experts("ForwardMany", routing, inputs, settings, settings.forward_timeout,
                         keep_activations=keep_activations),
            settings.forward_timeout + 5.0)
        outputs = torch.zeros(routing.batch, routing.k, *x.shape[1:])
        alive = torch.zeros(routing.batch, routing.k, dtype=torch.bool)
        for e, result in enumerate(results):
            if result is None:
                continue
            (output,) = result
            if output.shape != inputs[e][0].shape:
                errors.append(f"expert {routing.experts[e].name!r} answered shape {list(output.shape)}, "
                              f"expected {list(inputs[e][0].shape)}")
                results[e] = None
                continue
            outputs[routing.samples[e], routing.slots[e]] = output.float()
            alive[routing.samples[e], routing.slots[e]] = True
        _check_enough(alive, routing, settings, errors)
        ctx.routing, ctx.settings, ctx.answered, ctx.handles = routing, settings, [r is not None for r in results], handles
        ctx.dtypes = dtypes  # the backward sends each expert what its forward did
        ctx.save_for_backward(x)
        ctx.mark_non_differentiable(alive)
        return outputs.to(x.device, x.dtype), alive.to(x.device)

    @staticmethod
    def backward(ctx: Any, grad_outputs: torch.Tensor, _: Any) -> tuple[None, None, None, None, torch.Tensor | None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        routing: Routing = ctx.routing
        settings: FaultTolerance = ctx.settings
        x_cpu, grad_cpu = x.detach().cpu(), grad_outputs.detach().cpu()
        tensors = [[x_cpu[samples].to(dtype), grad_cpu[samples, slots].to(dtype)] if answered else None
                   for samples, slots, answered, dtype in zip(routing.samples, routing.slots, ctx.answered, ctx.dtypes)]
        results, errors, _ = run_sync(
            call_experts("BackwardMany", routing, tensors, settings, settings.backward_timeout, handles=ctx.handles),
            settings.backward_timeout + 5.0)
        if errors:
            logger.warning("backward: %d experts failed: %s", len(errors), "; ".join(errors[:MAX_ERRORS_SHOWN]))
        if not ctx.needs_input_grad[4]:
            return None, None, None, None, None
        grad_x = torch.zeros_like(x_cpu, dtype=torch.float32)
        for e, result in enumerate(results):
            if result is not None and result[0].shape == tensors[e][0].shape:  # type: ignore[index]
                grad_x.index_add_(0, routing.samples[e], result[0].float())
        return None, None, None, None, grad_x.to(x.device, x.dtype)


def _check_enough(alive: torch.Tensor, routing: Routing, settings: FaultTolerance, errors: list[str]) -> None:
    short = int((alive.sum(1) < settings.k_min).sum())
    if short and not settings.allow_zero_outputs:
        shown = "; ".join(errors[:MAX_ERRORS_SHOWN]) or "no live expert found"
        raise ExpertsUnavailable(f"{short} of {routing.batch} samples got fewer than k_min={settings.k_min} expert "
                                 f"outputs ({shown})")
    if errors:
        logger.warning("forward: %d experts failed: %s", len(errors), "; ".join(errors[:MAX_ERRORS_SHOWN]))

"""`RemoteMixtureOfExperts`: a layer whose experts live on expert servers anywhere in the swarm.

A gating network scores every coordinate of the experts' grid; a beam search over the DHT
(`apiary.moe.beam_search`) picks each sample's `k_best` live experts; the samples go to their
experts in one call per server (`apiary.moe.dispatch`); the outputs of the experts that
answered are mixed by the softmax of their gate scores. The samples travel to each expert in its
schema's dtype (bfloat16 or float16 halve the bytes; float32 until the expert has answered once:
`apiary.moe.wire_dtypes`), unless `wire_dtype` forces one; the gate, the mixing weights, the
outputs and the gradients stay in the caller's dtype. Gradients flow into the gate (through
the mixing weights) and, through the experts, into the input; the experts train themselves
on the server when the backward pass reaches them.

The DHT must live on `apiary.moe.client.background_loop()`, where every remote call runs:
e.g. `dht = run_sync(DHTNode.launch(initial_peers, wire=...), 30)` or a `DHTClient` of the
participant's dht service. The experts are dialled as the DHT node dials (TLS or plaintext, a
private run's token), or with the `pool` given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from apiary.dht.interface import DHTLike
from apiary.moe.bans import ServerBans, server_bans
from apiary.moe.beam_search import ExpertChoice, beam_search, check_search_bounds
from apiary.moe.client import run_sync, shared_pool
from apiary.wire import ChannelPool
from apiary.moe.dispatch import ALWAYS_BACKWARD, ExpertPass, FaultTolerance, Routing, Traffic
from apiary.moe.wire_dtypes import WireDtypes


class RemoteMixtureOfExperts(nn.Module):
    """Mixes the `k_best` live experts of the grid `prefix` ([batch, in_features] or
    [batch, seq, in_features] in and out; experts map in_features to in_features).

    `grid_size` is the grid's shape (experts `prefix.i.j` with i < grid_size[0], j < grid_size[1]);
    `fault_tolerance` sets k_min, timeouts and `allow_zero_outputs` (see `FaultTolerance`);
    `keep_activations` asks the servers to keep a training pass's activations for its backward.
    `pool` dials the expert servers (used on `background_loop()` only); by default, one made
    like the DHT node's or DHT client's (`dht.pool`: its TLS or plaintext, identity and private-run token), or,
    for a DHT without one, the process's shared pool (TLS, no token).
    `search_timeout` bounds the beam search in the DHT, which then goes on with the experts found
    (default: the fault tolerance's `forward_timeout`); `beam_size` (at least `k_best`, default
    `k_best`) is the prefixes each sample keeps per grid level, `max_lookups` (at least 1, default
    `beam_size`) the DHT keys the search reads per level whatever the batch.
    `bans` skips servers that failed recently (default: the process's list, `apiary.moe.bans`).
    `wire_dtype` is the dtype every expert call carries (None: each expert's, as learnt in `dtypes`,
    default the process's table); `traffic` counts the bytes of the calls.
    """

    def __init__(self, *, in_features: int, grid_size: Sequence[int], dht: DHTLike, prefix: str, k_best: int = 4,
                 beam_size: int | None = None, fault_tolerance: FaultTolerance | None = None,
                 search_timeout: float | None = None, keep_activations: bool = True,
                 pool: ChannelPool | None = None, bans: ServerBans | None = None,
                 wire_dtype: torch.dtype | None = None, dtypes: WireDtypes | None = None,
                 max_lookups: int | None = None):
        super().__init__()
        check_search_bounds(k_best, beam_size, max_lookups)
        if not grid_size or any(size < 1 for size in grid_size):
            raise ValueError(f"grid_size must be a non-empty sequence of positive sizes, got {list(grid_size)}")
        if not prefix or "." in prefix:
            raise ValueError(f"prefix must be a grid's name without dots (e.g. 'ffn'), got {prefix!r}")
        self.in_features = in_features
        self.grid_size = tuple(grid_size)
        self.dht = dht
        self.prefix = prefix
        self.k_best = k_best
        self.beam_size = beam_size
        self.max_lookups = max_lookups
        self.fault_tolerance = fault_tolerance or FaultTolerance()
        self.search_timeout = search_timeout if search_timeout is not None else self.fault_tolerance.forward_timeout
        self.keep_activations = keep_activations
        dht_pool = getattr(dht, "pool", None)
        self.pool = pool or (dht_pool.copy() if isinstance(dht_pool, ChannelPool) else None)
        self.bans = bans if bans is not None else server_bans()
        self.wire_dtype = wire_dtype
        self.dtypes = dtypes
        self.traffic = Traffic()
        self.gate = nn.Linear(in_features, sum(self.grid_size))

    def grid_scores(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The gate's scores of each grid dimension's coordinates, [batch, size] each."""
        features = x if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)
        return list(self.gate(features).split(self.grid_size, dim=-1))

    def find_experts(self, grid_scores: Sequence[torch.Tensor], k: int) -> list[list[ExpertChoice]]:
        """The `k` best live experts of every sample (fewer where fewer are declared or found in
        `search_timeout`), skipping banned servers."""
        search = beam_search(self.dht, self.prefix, grid_scores, k, self.beam_size, timeout=self.search_timeout,
                             banned=self.bans.banned, max_lookups=self.max_lookups)
        return run_sync(search, self.search_timeout + 1.0)

    def call_experts(self, x: torch.Tensor, choices: Sequence[Sequence[ExpertChoice]], k: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every chosen expert's output ([batch, k, ...]), which of them answered ([batch, k]) and
        their coordinates ([batch, k, grid dimensions]; 0 in empty slots)."""
        routing = Routing.of(choices, k, self.pool or shared_pool(), self.bans, dtypes=self.dtypes,
                             wire_dtype=self.wire_dtype, traffic=self.traffic)
        keep = self.keep_activations and torch.is_grad_enabled()
        outputs, alive = ExpertPass.apply(ALWAYS_BACKWARD, routing, self.fault_tolerance, keep, x)
        coordinates = torch.zeros(len(choices), k, len(self.grid_size), dtype=torch.long)
        for sample, chosen in enumerate(choices):
            for slot, choice in enumerate(chosen[:k]):
                coordinates[sample, slot] = torch.tensor(choice.coordinates)
        return outputs, alive, coordinates.to(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features or x.dim() not in (2, 3):
            raise ValueError(f"input shape is {list(x.shape)}, expected [batch, {self.in_features}] "
                             f"or [batch, seq, {self.in_features}]")
        grid_scores = self.grid_scores(x)
        choices = self.find_experts(grid_scores, self.k_best)
        outputs, alive, coordinates = self.call_experts(x, choices, self.k_best)
        logits = sum(scores.gather(1, coordinates[:, :, d]) for d, scores in enumerate(grid_scores))
        logits = logits.masked_fill(~alive, torch.finfo(logits.dtype).min)
        weights = torch.softmax(logits, dim=1) * alive  # a sample with no answer gets zeros
        return (weights.reshape(*weights.shape, *[1] * (outputs.dim() - 2)) * outputs).sum(1)

    def extra_repr(self) -> str:
        return f"prefix={self.prefix!r}, grid_size={self.grid_size}, k_best={self.k_best}"

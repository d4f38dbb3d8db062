"""`RemoteSwitchMixtureOfExperts`: top-1 routing with a load-balancing loss (Switch Transformer
style), over the same grid, DHT search and fault tolerance as `RemoteMixtureOfExperts`.

Each sample goes to its single best live expert; the output is that expert's output scaled by
the router's probability of it (the product over grid dimensions of the softmax of the
coordinate scores), so the router learns from the output. The balancing loss is, per grid
dimension d of size n_d, n_d · Σ_c f_dc · P_dc (f_dc: the fraction of samples routed to
coordinate c, P_dc: the router's mean probability of c), summed over dimensions: it equals the
number of dimensions when the load is uniform and grows as it concentrates. Add it, scaled by a
small factor, to the training loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from apiary.dht.interface import DHTLike
from apiary.moe.bans import ServerBans
from apiary.moe.dispatch import FaultTolerance
from apiary.moe.mixture import RemoteMixtureOfExperts
from apiary.moe.wire_dtypes import WireDtypes
from apiary.wire import ChannelPool


class RemoteSwitchMixtureOfExperts(RemoteMixtureOfExperts):
    """forward(x) → (output, balancing_loss). A sample whose expert does not answer gets a zero
    output when `fault_tolerance.allow_zero_outputs` (meant for use inside a residual block),
    else the pass raises `ExpertsUnavailable`."""

    def __init__(self, *, in_features: int, grid_size: Sequence[int], dht: DHTLike, prefix: str,
                 beam_size: int | None = None, fault_tolerance: FaultTolerance | None = None,
                 search_timeout: float | None = None, keep_activations: bool = True,
                 pool: ChannelPool | None = None, bans: ServerBans | None = None,
                 wire_dtype: torch.dtype | None = None, dtypes: WireDtypes | None = None,
                 max_lookups: int | None = None):
        super().__init__(in_features=in_features, grid_size=grid_size, dht=dht, prefix=prefix, k_best=1,
                         beam_size=beam_size, fault_tolerance=fault_tolerance, search_timeout=search_timeout,
                         keep_activations=keep_activations, pool=pool, bans=bans, wire_dtype=wire_dtype,
                         dtypes=dtypes, max_lookups=max_lookups)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if x.shape[-1] != self.in_features or x.dim() not in (2, 3):
            raise ValueError(f"input shape is {list(x.shape)}, expected [batch, {self.in_features}] "
                             f"or [batch, seq, {self.in_features}]")
        grid_scores = self.grid_scores(x)
        choices = self.find_experts(grid_scores, 1)
        outputs, alive, coordinates = self.call_experts(x, choices, 1)
        probabilities = [torch.softmax(scores, dim=-1) for scores in grid_scores]
        chosen = torch.ones(x.shape[0], 1, device=x.device, dtype=x.dtype)
        for d, p in enumerate(probabilities):
            chosen = chosen * p.gather(1, coordinates[:, :, d])
        weights = chosen * alive  # [batch, 1]
        output = (weights.reshape(*weights.shape, *[1] * (outputs.dim() - 2)) * outputs).sum(1)
        return output, self._balancing_loss(probabilities, coordinates[:, 0], alive[:, 0])

    def _balancing_loss(self, probabilities: list[torch.Tensor], coordinates: torch.Tensor,
                        routed: torch.Tensor) -> torch.Tensor:
        loss = probabilities[0].new_zeros(())
        count = routed.sum().clamp(min=1)
        for d, p in enumerate(probabilities):
            size = p.shape[-1]
            load = torch.zeros(size, device=p.device, dtype=p.dtype)
            load.index_add_(0, coordinates[routed, d], torch.ones_like(coordinates[routed, d], dtype=p.dtype))
            loss = loss + size * (load / count * p.mean(0)).sum()
        return loss

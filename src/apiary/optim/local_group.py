"""A participant's local ranks: one trainer per GPU, reduced among themselves before the swarm.

The ranks of one participant form a `torch.distributed` group on the host (NCCL when every rank
is on CUDA, else gloo over loopback). Every step each rank back-propagates its own batch, then
`reduce_gradients` leaves on every rank the mean gradient of all the ranks' samples (each
rank's gradient weighted by its batch size). Rank 0 alone holds the collaborative optimizer:
it steps with the participant's total samples, so the swarm sees one peer whose progress counts
every rank's samples and whose averaging rounds cost what a one-GPU peer's cost. `share` then
broadcasts rank 0's parameters and buffers when its step changed them (an update, a loaded or
averaged state), so the ranks stay identical; `digests` lets rank 0 check that they are.

Rank 0 leads every collective's order: it tells the others whether to go on (`go`), whether
to take its tensors and check digests (`share`); the others follow. These control messages
always travel over gloo, where the ranks wait for rank 0 (its swarm rounds may take minutes)
and a lost rank is noticed at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist


DATA_TIMEOUT = 300.0  # seconds an NCCL collective of tensors may take


class LocalGroupError(RuntimeError):
    """A local rank failed or stopped: the participant's group cannot go on."""


class LocalGroup:
    """This process's place in its participant's group of `size` local ranks."""

    def __init__(self, rank: int, size: int, device: torch.device, store: dist.Store, timeout: float):
        """`timeout`: the longest the others may wait for rank 0 (its swarm rounds included)."""
        self.rank, self.size, self.device = rank, size, device
        self.backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # The ranks wait for rank 0 in the control messages (gloo, which notices a lost rank at
        # once); NCCL's tensor collectives start together, so a short limit is enough there.
        data_timeout = min(timeout, DATA_TIMEOUT) if self.backend == "nccl" else timeout
        dist.init_process_group(self.backend, store=store, rank=rank, world_size=size,
                                timeout=timedelta(seconds=data_timeout))
        self._control = (dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
                         if self.backend == "nccl" else None)  # None: the default (gloo) group

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def go(self, going: bool = True) -> bool:
        """Rank 0 says whether the ranks train one more batch; every rank returns what it said."""
        return bool(self._flags([int(going)])[0])

    def reduce_gradients(self, params: Sequence[torch.nn.Parameter], batch_size: int) -> int:
        """Leaves in every parameter's `.grad` the mean gradient over all the ranks' samples;
        returns the ranks' total samples. A parameter without a gradient counts as zeros."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        total = torch.tensor([float(batch_size)], device=self.device)
        dist.all_reduce(total)
        samples = int(total.item())
        for group in _by_dtype([p.grad for p in params]):
            flat = torch.cat([g.reshape(-1) for g in group]).mul_(batch_size)
            dist.all_reduce(flat)
            _unflatten(flat.div_(samples), group)
        return samples

    def share(self, tensors: Sequence[torch.Tensor], changed: bool = False, check: bool = False) -> bool:
        """Rank 0 says whether its `tensors` changed (then every rank takes them) and whether to
        compare digests now (`digests` must follow on every rank); returns `check`."""
        changed, check = map(bool, self._flags([int(changed), int(check)]))
        if changed:
            with torch.no_grad():
                for group in _by_dtype(list(tensors)):
                    flat = torch.cat([t.detach().reshape(-1) for t in group])
                    dist.broadcast(flat, src=0)
                    if not self.leader:
                        _unflatten(flat, group)
        return check

    def digests(self, tensors: Sequence[torch.Tensor]) -> list[str]:
        """Every rank's digest of `tensors` (a hash of, per tensor, the sum and the sum of squares
        in float64): equal digests mean the ranks hold the same values."""
        with torch.no_grad():
            mine = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for t in tensors]).reshape(-1)
        gathered = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(gathered, mine)
        return [hashlib.sha256(g.cpu().numpy().tobytes()).hexdigest()[:16] for g in gathered]

    def _flags(self, values: list[int]) -> list[int]:
        flags = torch.tensor(values, dtype=torch.int64)
        dist.broadcast(flags, src=0, group=self._control)
        return flags.tolist()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`tensors` grouped by dtype (one flat buffer per group), in their order."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


def _unflatten(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copies the consecutive slices of `flat` into `tensors`."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()

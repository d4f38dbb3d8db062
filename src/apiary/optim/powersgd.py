"""`PowerSGD` ("powersgd"): gradient averaging with low-rank compression and error feedback.

Each large gradient (2-D or more, viewed as an n x m matrix M of its first dimension by the
rest, with `min_size` elements or more and rank x (n + m) < n x m) travels as two thin matrices
instead of n x m values. At the epoch's end, per matrix:

1. error feedback: M = the epoch's mean gradient + `residual` (what earlier epochs did not send);
2. P = M Q, with Q from the previous epoch (warm start), or on the first one a random one whose
   seed (`seed`, the run's, and the epoch) every peer of the swarm shares;
3. round one averages the P's (weighted by samples) with the small tensors, uncompressed;
4. P is orthonormalized (QR), Q = M^T P, and round two averages the Q's;
5. the update is P Q^T (the projection of the swarm's mean M on the span of P), and
   residual = M - P Q^T.

A peer whose round-two group is not its round-one group (the averager reports each round's
members) would apply a projection its partners do not share, so it steps on its own gradient
instead (logged), as it does when a round finds no group or fails: its matrices' gradients are
then its own M and their residuals reset. The small tensors keep round one's average. (An
averager older than the member list reports none: then only the groups' sizes are compared.)

Round one runs under the epoch's round index (the one the optimizer forms groups ahead for),
round two under `Q_ROUNDS` + the epoch: a gradient round (below `STATE_ROUNDS`) on the same
Moshpit axis (the offset is a multiple of every grid's number of dimensions up to 16).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from apiary.optim.rules import RoundGroup, Rounds, UpdateRule

logger = logging.getLogger(__name__)

Q_ROUNDS = 720720 << 12  # lcm(1..16) x 4096: below STATE_ROUNDS (2^32), on the P round's grid axis


def compressible(shape: torch.Size, rank: int, min_size: int) -> bool:
    """A tensor of `shape` travels as rank-`rank` factors: 2-D or more, large, and smaller so."""
    if len(shape) < 2 or shape.numel() < min_size:
        return False
    rows = shape[0]
    return rank * (rows + shape.numel() // rows) < shape.numel()


def round_values(shapes: list[torch.Size], rank: int, min_size: int) -> tuple[int, int]:
    """Values one peer averages per epoch: (round one: the P's and the small tensors, round two:
    the Q's; none when nothing is compressed)."""
    first = second = 0
    for shape in shapes:
        if compressible(shape, rank, min_size):
            first += rank * shape[0]
            second += rank * (shape.numel() // shape[0])
        else:
            first += shape.numel()
    return first, second


class PowerSGD(UpdateRule):
    mode = "powersgd"

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 scheduler: Any | None, rounds: Rounds, rank: int = 4, min_size: int = 4096, seed: int = 0):
        super().__init__(params, optimizer, scheduler, rounds)
        if rank < 1:
            raise ValueError(f"powersgd_rank must be at least 1, got {rank}")
        if min_size < 0:
            raise ValueError(f"powersgd_min_size must be 0 or more, got {min_size}")
        self.rank, self.min_size, self.seed = rank, min_size, seed
        self.accumulated = [torch.zeros_like(p) for p in params]  # sum over batches of gradient x samples
        self.matrices = [i for i, p in enumerate(params) if compressible(p.shape, rank, min_size)]
        self.small = [i for i in range(len(params)) if i not in self.matrices]
        self.residuals = [torch.zeros(self._rows(i), self._cols(i), device=params[i].device)
                          for i in self.matrices]
        self.qs: list[torch.Tensor] | None = None  # the previous epoch's Q's (warm start)
        self.fallbacks = 0  # epochs this peer stepped on its own gradient

    def _rows(self, index: int) -> int:
        return self.params[index].shape[0]

    def _cols(self, index: int) -> int:
        return self.params[index].numel() // self.params[index].shape[0]

    def round_template(self) -> list[torch.Tensor]:
        """Shaped like round one's tensors (the P's, then the small tensors)."""
        device = self.params[0].device
        return ([torch.zeros(self._rows(i), self.rank, device=device) for i in self.matrices]
                + [torch.zeros_like(self.params[i]) for i in self.small])

    def on_batch(self, batch_size: int) -> None:
        with torch.no_grad():
            for buffer, p in zip(self.accumulated, self.params):
                if p.grad is not None:
                    buffer.add_(p.grad, alpha=batch_size)

    def finish_epoch(self, epoch: int, samples: int) -> None:
        with torch.no_grad():
            grads = [buffer / max(samples, 1) for buffer in self.accumulated]
            self.drop()
            ms = [grads[i].float().reshape(self._rows(i), self._cols(i)) + residual
                  for i, residual in zip(self.matrices, self.residuals)]
            updates = self._average(ms, [grads[i] for i in self.small], float(samples), epoch)
            for i, update in zip(self.matrices, updates):
                grads[i] = update.reshape(self.params[i].shape).to(grads[i].dtype)
            for p, g in zip(self.params, grads):
                p.grad = g
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            for p in self.params:
                p.grad = None
        self._updated()

    def _average(self, ms: list[torch.Tensor], small: list[torch.Tensor], weight: float,
                 epoch: int) -> list[torch.Tensor]:
        """The matrices' updates (the small tensors are averaged in place); residuals updated."""
        qs = self.qs if self.qs is not None else self._random_qs(epoch)
        ps = [m @ q for m, q in zip(ms, qs)]
        first = self.rounds.result(self.rounds.start([*ps, *small], weight, epoch),
                                   f"the PowerSGD P round of epoch {epoch}")
        if not first:
            return self._alone(ms, epoch, "its P round found no group or failed")
        if not ms:
            return []
        ps = [torch.linalg.qr(p).Q for p in ps]
        qs = [m.T @ p for m, p in zip(ms, ps)]
        second = self.rounds.result(self.rounds.start(qs, weight, Q_ROUNDS + epoch),
                                    f"the PowerSGD Q round of epoch {epoch}")
        if not second:
            return self._alone(ms, epoch, "its Q round found no group or failed")
        if second != first:
            return self._alone(ms, epoch, f"its Q round's group ({_named(second)}) is not its P round's "
                                          f"({_named(first)})", logging.WARNING)
        self.qs = qs
        updates = [p @ q.T for p, q in zip(ps, qs)]
        self.residuals = [m - update for m, update in zip(ms, updates)]
        return updates

    def _alone(self, ms: list[torch.Tensor], epoch: int, why: str, level: int = logging.INFO) -> list[torch.Tensor]:
        """This peer's own matrices (their residuals included, so reset)."""
        logger.log(level, "PowerSGD: epoch %d steps on this peer's own gradient: %s", epoch, why)
        self.fallbacks += 1
        self.residuals = [torch.zeros_like(m) for m in ms]
        return ms

    def _random_qs(self, epoch: int) -> list[torch.Tensor]:
        """The first epoch's Q's: the same on every peer of the run that starts at `epoch`."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (1 << 63))
        return [torch.randn(self._cols(i), self.rank, generator=generator).to(self.params[i].device)
                for i in self.matrices]

    def drop(self) -> None:
        for buffer in self.accumulated:
            buffer.zero_()


def _named(group: RoundGroup) -> str:
    """A group for a log line: its size and members."""
    return f"of {group.size}: {', '.join(group.members) or 'members not reported'}"

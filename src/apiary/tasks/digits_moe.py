"""A mixture-of-experts classifier of scikit-learn's bundled digits, with remote experts.

The trainer holds an embedding, the gate and a classifier head (averaged with the swarm by
the collaborative optimizer); the experts of the grid `prefix` live on expert servers
(`apiary expert-server --experts digits.[0:3].[0:4] --hidden-size 32`) and train themselves.
The task reaches the experts through the participant's dht service or a client-mode DHT node
(`apiary.tasks.swarm`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from apiary.moe.beam_search import check_search_bounds
from apiary.moe.dispatch import FaultTolerance
from apiary.moe.mixture import RemoteMixtureOfExperts
from apiary.tasks import Task
from apiary.tasks.swarm import experts_dht


class DigitsClassifier(nn.Module):
    def __init__(self, moe: RemoteMixtureOfExperts, hidden: int):
        super().__init__()
        self.embed = nn.Linear(64, hidden)
        self.moe = moe
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        return self.head(h + self.moe(h))


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    return torch.tensor(features / 16.0, dtype=torch.float32), torch.tensor(labels)


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        for indices in torch.randperm(len(y), generator=generator).split(batch_size):
            yield x[indices], y[indices]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def task(initial_peers: str = "", seed: int = 0, model_seed: int = 0, prefix: str = "digits",
         grid: tuple[int, int] = (3, 4), hidden: int = 32, k_best: int = 3, batch_size: int = 64, lr: float = 0.01,
         timeout: float = 5.0, dht_local: str = "", beam_size: int | None = None,
         max_lookups: int | None = None) -> Task:
    """The task; `dht_local`: the participant's dht service (default: the trainer's
    APIARY_DHT_LOCAL), or `initial_peers`: any DHT node of the swarm where the expert servers declare;
    `beam_size` and `max_lookups`: the mixture's beam search (`RemoteMixtureOfExperts`)."""
    check_search_bounds(k_best, beam_size, max_lookups)  # before joining the DHT
    dht = experts_dht("digits_moe", initial_peers, dht_local)
    x, y = _digits()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, held_out = order[:1400], order[1400:]
    torch.manual_seed(model_seed)
    moe = RemoteMixtureOfExperts(
        in_features=hidden, grid_size=grid, dht=dht, prefix=prefix, k_best=k_best, beam_size=beam_size,
        max_lookups=max_lookups,
        fault_tolerance=FaultTolerance(k_min=1, forward_timeout=timeout, backward_timeout=timeout,
                                       timeout_after_k_min=timeout / 10, allow_zero_outputs=True),
    )
    model = DigitsClassifier(moe, hidden)

    def evaluate(m: nn.Module) -> float:
        with torch.no_grad():
            return nn.functional.cross_entropy(m(x[held_out]), y[held_out]).item()

    return Task(model=model, batches=_batches(x[train], y[train], batch_size, seed), loss=_loss,
                optimizer=lambda params: torch.optim.Adam(params, lr=lr), batch_size=batch_size, evaluate=evaluate)


def accuracy(model: nn.Module) -> float:
    """Held-out accuracy (the 397 digits the training never sees)."""
    x, y = _digits()
    held_out = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[1400:]
    with torch.no_grad():
        return (model(x[held_out]).argmax(1) == y[held_out]).float().mean().item()

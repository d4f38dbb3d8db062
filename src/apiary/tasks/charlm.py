"""A character-level transformer language model, trained on the standard library's sources.

Every Python installation carries its standard library, so the data needs no download: the
text of a fixed, sorted list of modules is read, encoded as bytes (vocabulary 256), and split
into a training stream (every peer samples its own windows from it, by `seed`) and a held-out
tail for evaluation.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from apiary.tasks import Task
from apiary.tasks.corpus import as_bytes, modules
from apiary.tasks.corpus import windows as _windows

VOCABULARY = 256
MODULES = ("argparse", "ast", "asyncio/base_events", "collections/__init__", "dataclasses", "functools",
           "inspect", "json/decoder", "logging/__init__", "pathlib", "subprocess", "textwrap", "typing")


@functools.lru_cache(maxsize=1)
def corpus() -> torch.Tensor:
    """The bytes of the chosen standard-library modules (those present), as a uint8 tensor."""
    return as_bytes(modules(MODULES))


class CharTransformer(nn.Module):
    """Byte embeddings, learned positions, a few pre-norm transformer layers, a byte classifier."""

    def __init__(self, context: int, width: int, layers: int, heads: int):
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCABULARY)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        h = self.embedding(tokens) + self.position[:length]
        h = self.layers(h, mask=self.mask[:length, :length], is_causal=True)
        return self.head(self.norm(h))


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    batch = batch.to(device)
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCABULARY), batch[:, 1:].reshape(-1))


def task(seed: int = 0, model_seed: int = 0, batch_size: int = 16, context: int = 64, width: int = 64,
         layers: int = 2, heads: int = 4, lr: float = 3e-3, eval_batches: int = 4) -> Task:
    """The task; `seed` picks this peer's training windows, `model_seed` the initial weights."""
    data = corpus()
    split = int(len(data) * 0.95)
    train, held_out = data[:split], data[split:]
    torch.manual_seed(model_seed)
    model = CharTransformer(context, width, layers, heads)
    evaluation = list(zip(range(eval_batches), _windows(held_out, context, 32, seed=12345)))

    def evaluate(m: nn.Module) -> float:
        with torch.no_grad():
            return sum(_loss(m, batch).item() for _, batch in evaluation) / len(evaluation)

    return Task(
        model=model,
        batches=_windows(train, context, batch_size, seed),
        loss=_loss,
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
        batch_size=batch_size,
        evaluate=evaluate,
    )

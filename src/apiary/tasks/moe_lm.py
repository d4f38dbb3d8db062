"""The flagship task: a transformer language model whose expert layers live on the swarm's expert servers.

A decoder-only transformer (pre-norm, causal) over the standard library's sources in full
(`apiary.tasks.corpus`: bytes, or a BPE tokenizer trained locally and cached). The
feed-forward block of every other layer (1, 3, ...) is a mixture of experts routing each
token to its `k_best` experts of that layer's grid `lm<layer>` (`expert_grid(preset)` says
what the expert servers host: `apiary expert-server --task moe_lm[:preset]`). The trunk
(embeddings, attention, norms, dense blocks and gates) is what the collaborative optimizer
averages; the experts train themselves on their servers.

`experts` chooses where the experts are: "remote" (a `RemoteMixtureOfExperts` per layer, found
through the participant's dht: `apiary.tasks.swarm`), "local" (the same model with the same
gates and expert modules in this process: the reference run), or "dense" (no experts: a
feed-forward block as wide as `k_best` experts, the same compute per token). Remote and local
models of one `model_seed` start from the same trunk and gate weights.

Presets: `tiny` (tests and `apiary up`: seconds per epoch on a CPU) and `base` (0.12 B
parameters with its experts, for GPUs).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from apiary.dht.interface import DHTLike
from apiary.moe.beam_search import check_search_bounds
from apiary.moe.dispatch import FaultTolerance
from apiary.moe.kinds import FeedForward
from apiary.moe.mixture import RemoteMixtureOfExperts
from apiary.tasks import ExpertGrid, Task
from apiary.tasks.corpus import BYTE_VOCABULARY, as_bytes, bpe, stdlib, windows
from apiary.tasks.swarm import experts_dht

EXPERTS = ("remote", "local", "dense")
TOKENIZERS = ("bytes", "bpe")
HELD_OUT = 0.05  # the tail of the token stream, never trained on
EVAL_SEED = 12345


@dataclass(frozen=True)
class Preset:
    """A model size and its training defaults."""

    width: int
    layers: int
    heads: int
    context: int
    grid: tuple[int, ...]  # each MoE layer's grid of experts
    k_best: int
    batch_size: int
    lr: float
    tokenizer: str  # "bytes" or "bpe"
    bpe_vocabulary: int


PRESETS = {
    "tiny": Preset(width=64, layers=4, heads=4, context=64, grid=(4, 4), k_best=2, batch_size=8, lr=3e-3,
                   tokenizer="bytes", bpe_vocabulary=2048),
    "base": Preset(width=512, layers=6, heads=8, context=256, grid=(4, 4), k_best=2, batch_size=32, lr=6e-4,
                   tokenizer="bpe", bpe_vocabulary=8192),
}


def _preset(name: str) -> Preset:
    """The preset `name`; ValueError naming the presets otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown moe_lm preset {name!r} (presets: {', '.join(PRESETS)})")
    return PRESETS[name]


def moe_layers(p: Preset) -> list[int]:
    """The layers whose feed-forward block is a mixture of experts: 1, 3, ..."""
    return list(range(1, p.layers, 2))


def expert_grid(name: str = "tiny") -> ExpertGrid:
    """What the expert servers of a run of preset `name` host: every MoE layer's grid."""
    p = _preset(name)
    ranges = ".".join(f"[0:{size}]" for size in p.grid)
    return ExpertGrid(patterns=",".join(f"lm{layer}.{ranges}" for layer in moe_layers(p)), hidden_size=p.width,
                      kind="ffn")


class TokenRouting(nn.Module):
    """Routes every token on its own: [batch, seq, width] goes to the mixture as [batch * seq, width]."""

    def __init__(self, mixture: nn.Module):
        super().__init__()
        self.mixture = mixture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixture(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class LocalMixtureOfExperts(nn.Module):
    """The remote mixture's routing with the experts in this process: the gate scores each grid
    coordinate, an expert's score is the sum of its coordinates', each sample goes to its
    `k_best` best experts, mixed by the softmax of their scores. Expert `prefix.i.j` starts
    from a seed of its own (`model_seed` and its name), drawn aside from the trunk's."""

    def __init__(self, width: int, grid: tuple[int, ...], k_best: int, prefix: str, model_seed: int):
        super().__init__()
        self.grid_size = grid
        self.k_best = k_best
        self.gate = nn.Linear(width, sum(grid))
        experts = []
        with torch.random.fork_rng(devices=[]):
            for coordinates in itertools.product(*map(range, grid)):
                torch.manual_seed(_seed_of(model_seed, ".".join([prefix, *map(str, coordinates)])))
                experts.append(FeedForward(width))
        self.experts = nn.ModuleList(experts)  # in row-major grid order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.gate(x).split(self.grid_size, dim=-1)
        total = scores[0]
        for level in scores[1:]:
            total = (total[:, :, None] + level[:, None, :]).reshape(len(x), -1)
        best, chosen = total.topk(self.k_best, dim=1)
        weights = torch.softmax(best, dim=1)
        output = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            rows, slots = (chosen == index).nonzero(as_tuple=True)
            if len(rows):
                output = output.index_add(0, rows, weights[rows, slots, None] * expert(x[rows]))
        return output


def _seed_of(model_seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{model_seed}:{name}".encode()).digest()[:7], "big")


class Block(nn.Module):
    """A pre-norm transformer layer: causal self-attention, then the feed-forward block `ffn`."""

    def __init__(self, width: int, heads: int, ffn: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.ffn = ffn

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, attn_mask=mask, need_weights=False, is_causal=True)[0]
        return x + self.ffn(self.norm2(x))


class MoELanguageModel(nn.Module):
    """Token embeddings, learned positions, `layers` blocks (`ffn(layer)` gives each block's
    feed-forward module), a final norm and the token classifier."""

    def __init__(self, vocabulary: int, p: Preset, ffn: Callable[[int], nn.Module]):
        super().__init__()
        self.vocabulary = vocabulary
        self.embedding = nn.Embedding(vocabulary, p.width)
        self.position = nn.Parameter(torch.zeros(p.context, p.width))
        self.blocks = nn.ModuleList(Block(p.width, p.heads, ffn(layer)) for layer in range(p.layers))
        self.norm = nn.LayerNorm(p.width)
        self.head = nn.Linear(p.width, vocabulary)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(p.context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        h = self.embedding(tokens) + self.position[:length]
        for block in self.blocks:
            h = block(h, self.mask[:length, :length])
        return self.head(self.norm(h))


def build_model(name: str = "tiny", experts: str = "local", *, model_seed: int = 0, vocabulary: int | None = None,
                dht: DHTLike | None = None, k_best: int | None = None, timeout: float = 5.0,
                beam_size: int | None = None, max_lookups: int | None = None) -> MoELanguageModel:
    """The model of preset `name` with its experts `experts` ("remote" needs `dht`, where the
    expert servers declare; `beam_size` and `max_lookups` bound each remote mixture's beam search);
    `vocabulary`: default the preset tokenizer's."""
    p = _preset(name)
    if experts not in EXPERTS:
        raise ValueError(f"experts must be one of {', '.join(EXPERTS)}, got {experts!r}")
    if experts == "remote" and dht is None:
        raise ValueError("remote experts need the DHT where the expert servers declare them (dht)")
    k = k_best or p.k_best
    if not 1 <= k <= math.prod(p.grid):
        raise ValueError(f"k_best must be between 1 and the {math.prod(p.grid)} experts of a layer's grid, got {k}")
    check_search_bounds(k, beam_size, max_lookups)
    layers = set(moe_layers(p))
    tolerance = FaultTolerance(k_min=1, forward_timeout=timeout, backward_timeout=timeout,
                               timeout_after_k_min=timeout / 10, allow_zero_outputs=True)

    def ffn(layer: int) -> nn.Module:
        if layer not in layers:
            return FeedForward(p.width)
        if experts == "dense":
            return nn.Sequential(nn.Linear(p.width, 4 * k * p.width), nn.GELU(), nn.Linear(4 * k * p.width, p.width))
        if experts == "local":
            return TokenRouting(LocalMixtureOfExperts(p.width, p.grid, k, f"lm{layer}", model_seed))
        assert dht is not None  # checked above
        return TokenRouting(RemoteMixtureOfExperts(in_features=p.width, grid_size=p.grid, dht=dht,
                                                   prefix=f"lm{layer}", k_best=k, fault_tolerance=tolerance,
                                                   beam_size=beam_size, max_lookups=max_lookups))

    if vocabulary is None:
        vocabulary = BYTE_VOCABULARY if p.tokenizer == "bytes" else p.bpe_vocabulary
    torch.manual_seed(model_seed)
    return MoELanguageModel(vocabulary, p, ffn)


@functools.lru_cache(maxsize=2)
def tokens(tokenizer: str, vocabulary: int) -> torch.Tensor:
    """The whole standard library as tokens: bytes (`vocabulary` 256), or BPE with `vocabulary` tokens."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {tokenizer!r}")
    return as_bytes(stdlib()) if tokenizer == "bytes" else bpe(stdlib(), vocabulary)


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    batch = batch.to(next(model.parameters()).device)
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def task(preset: str = "tiny", seed: int = 0, model_seed: int = 0, experts: str = "remote", dht_local: str = "",
         initial_peers: str = "", tokenizer: str | None = None, batch_size: int | None = None,
         lr: float | None = None, timeout: float = 5.0, k_best: int | None = None, shards: int = 1,
         eval_batches: int = 2, beam_size: int | None = None, max_lookups: int | None = None) -> Task:
    """The task; `seed` picks this peer's shard (`seed % shards` of the training stream) and
    windows, `model_seed` the initial weights; remote experts are found through `dht_local`
    (default: the trainer's APIARY_DHT_LOCAL) or a DHT node joining `initial_peers`, each
    layer's by a beam search of `beam_size` and `max_lookups` (`RemoteMixtureOfExperts`)."""
    p = _preset(preset)
    check_search_bounds(k_best or p.k_best, beam_size, max_lookups)  # before reading the corpus
    if experts not in EXPERTS:
        raise ValueError(f"experts must be one of {', '.join(EXPERTS)}, got {experts!r}")
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    tokenizer = tokenizer or p.tokenizer
    vocabulary = BYTE_VOCABULARY if tokenizer == "bytes" else p.bpe_vocabulary
    data = tokens(tokenizer, vocabulary)
    split = int(len(data) * (1 - HELD_OUT))
    train, held_out = data[:split], data[split:]
    shard = train[len(train) * (seed % shards) // shards : len(train) * (seed % shards + 1) // shards]
    dht = experts_dht("moe_lm", initial_peers, dht_local) if experts == "remote" else None
    model = build_model(preset, experts, model_seed=model_seed, vocabulary=vocabulary, dht=dht, k_best=k_best,
                        timeout=timeout, beam_size=beam_size, max_lookups=max_lookups)
    evaluation = list(zip(range(eval_batches), windows(held_out, p.context, 16, seed=EVAL_SEED)))

    def evaluate(m: nn.Module) -> float:
        with torch.no_grad():
            return sum(_loss(m, batch).item() for _, batch in evaluation) / len(evaluation)

    size = batch_size or p.batch_size
    return Task(model=model, batches=windows(shard, p.context, size, seed), loss=_loss,
                optimizer=lambda params: torch.optim.AdamW(params, lr=lr or p.lr, weight_decay=0.0),
                batch_size=size, evaluate=evaluate)

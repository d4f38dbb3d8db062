"""Text the language-model tasks train on, needing no download: the standard library's sources.

Every Python installation carries its standard library. `modules(names)` reads a chosen few
modules (the `charlm` task); `stdlib()` reads every `.py` file under the standard library
(site-packages excluded) in sorted order. Text becomes tokens byte by byte (`as_bytes`,
vocabulary 256) or with a byte-level BPE tokenizer (`bpe`) trained locally with `tokenizers`
once per text and vocabulary size and cached with the encoded tokens under
$XDG_CACHE_HOME/apiary (default ~/.cache/apiary). `windows` samples training windows of a
token stream by seed.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

BYTE_VOCABULARY = 256
BPE_CHUNK_LINES = 4096  # lines encoded per batch item


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def modules(names: tuple[str, ...], minimum_bytes: int = 100_000) -> bytes:
    """The text of the standard-library modules `names` (e.g. "json/decoder") that are present,
    joined by newlines. Raises RuntimeError when less than `minimum_bytes` are found."""
    root = stdlib_root()
    paths = [root / f"{name}.py" for name in names]
    text = b"\n".join(path.read_bytes() for path in paths if path.exists())
    if len(text) < minimum_bytes:
        raise RuntimeError(f"the standard library sources under {root} are missing: the task needs them")
    return text


def stdlib_files() -> list[Path]:
    """Every `.py` file of the standard library (not site-packages), sorted by relative path."""
    root = stdlib_root()
    files = (path for path in root.rglob("*.py") if "site-packages" not in path.relative_to(root).parts)
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


@functools.lru_cache(maxsize=1)
def stdlib(minimum_bytes: int = 10_000_000) -> bytes:
    """The text of every standard-library source file, in `stdlib_files()` order, joined by newlines."""
    text = b"\n".join(path.read_bytes() for path in stdlib_files())
    if len(text) < minimum_bytes:
        raise RuntimeError(f"the standard library sources under {stdlib_root()} are incomplete "
                           f"({len(text)} bytes): the task needs them")
    return text


def as_bytes(text: bytes) -> torch.Tensor:
    """`text` as a uint8 tensor of byte values (vocabulary 256)."""
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).clone()


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "apiary"


def bpe(text: bytes, vocabulary: int) -> torch.Tensor:
    """`text` encoded by a byte-level BPE tokenizer of `vocabulary` tokens trained on it, as an
    int32 tensor. The tokenizer and the tokens are cached (keyed by the text's digest and the
    vocabulary), so only the first call for a text trains and encodes; calls at the same time
    (peers on one host) wait for it under a file lock."""
    if not 256 < vocabulary <= 65536:
        raise ValueError(f"the BPE vocabulary must be between 257 and 65536 tokens, got {vocabulary}")
    digest = hashlib.sha256(text).hexdigest()[:16]
    tokens_path = cache_dir() / f"bpe-{vocabulary}-{digest}.pt"
    tokens_path.parent.mkdir(parents=True, exist_ok=True)
    with open(tokens_path.with_suffix(".lock"), "w") as lock:  # peers on one host train it once, in turn
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tokens_path.exists():
            return torch.load(tokens_path, weights_only=True)
        tokenizer = _train_bpe(text, vocabulary)
        lines = text.decode("utf-8", errors="replace").splitlines(keepends=True)
        chunks = ["".join(lines[i : i + BPE_CHUNK_LINES]) for i in range(0, len(lines), BPE_CHUNK_LINES)]
        ids = [i for encoding in tokenizer.encode_batch_fast(chunks, add_special_tokens=False) for i in encoding.ids]
        tokens = torch.tensor(ids, dtype=torch.int32)
        _atomic_write(tokens_path.with_suffix(".json"), lambda path: tokenizer.save(str(path)))
        _atomic_write(tokens_path, lambda path: torch.save(tokens, path))  # last: its presence means done
        return tokens


def _train_bpe(text: bytes, vocabulary: int) -> Tokenizer:
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise RuntimeError("the BPE tokenizer needs the `tokenizers` package: pip install 'apiary[ml]'") from None
    logger.info("training a BPE tokenizer of %d tokens on %d bytes (once: cached in %s)",
                vocabulary, len(text), cache_dir())
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocabulary, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(text.decode("utf-8", errors="replace").splitlines(keepends=True), trainer)
    return tokenizer


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Writes through a temporary file then renames it, so no reader ever sees half a file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def windows(data: torch.Tensor, context: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of `batch_size` windows of `context + 1` tokens at random starts (by `seed`)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - context - 1, (batch_size,), generator=generator)
        yield torch.stack([data[s : s + context + 1] for s in starts.tolist()]).long()

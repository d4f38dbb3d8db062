"""Expert checkpoints: weights, optimizer state and update count of every expert, one file each.

An expert server saves them periodically and at shutdown, and loads them at start, so a
restarted server resumes each expert exactly where it was (same weights, same optimizer step).
A checkpoint names the optimizer that wrote it; an expert with another optimizer refuses it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from apiary.files import write_atomically
from apiary.moe.experts import Expert

logger = logging.getLogger(__name__)

class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or holds another kind or size of expert, or another optimizer's state."""


def checkpoint_path(directory: str | os.PathLike[str], expert: Expert) -> Path:
    return Path(directory) / f"{expert.name}.pt"


def save_checkpoints(experts: Mapping[str, Expert], directory: str | os.PathLike[str]) -> None:
    """Writes every expert's checkpoint atomically (a crash keeps the previous one)."""
    for expert in experts.values():
        with expert._lock:  # not in the middle of an optimizer step
            state = {
                "spec": {"name": expert.spec.name, "kind": expert.spec.kind, "hidden_size": expert.spec.hidden_size},
                "module": expert.module.state_dict(),
                "optimizer_name": expert.training.optimizer,
                "optimizer": expert.optimizer.state_dict() if expert.optimizer is not None else None,
                "updates": expert.updates,
            }
            write_atomically(checkpoint_path(directory, expert), lambda f: torch.save(state, f))
    logger.info("checkpoints of %d experts saved in %s", len(experts), directory, extra={"event": "checkpoint_saved"})


def load_checkpoints(experts: Mapping[str, Expert], directory: str | os.PathLike[str]) -> list[str]:
    """Restores every expert that has a checkpoint in `directory`; returns their names. A
    checkpoint of another kind, size or optimizer than the expert, or an unreadable one, raises
    CheckpointError."""
    loaded = []
    for expert in experts.values():
        path = checkpoint_path(directory, expert)
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            saved = state["spec"]
        except Exception as e:  # noqa: BLE001 - torch.load raises many types for a damaged file
            raise CheckpointError(f"checkpoint {path} cannot be read: {type(e).__name__}: {e}") from None
        if (saved["kind"], saved["hidden_size"]) != (expert.spec.kind, expert.spec.hidden_size):
            raise CheckpointError(
                f"checkpoint {path} holds a {saved['kind']} expert of hidden size {saved['hidden_size']}, "
                f"not {expert.spec.kind} of {expert.spec.hidden_size}"
            )
        optimizer_name = state.get("optimizer_name", "adam")  # checkpoints that do not say were all Adam's
        if optimizer_name != expert.training.optimizer:
            raise CheckpointError(f"checkpoint {path} was written with the {optimizer_name} optimizer, not "
                                  f"{expert.training.optimizer}: start with --optimizer {optimizer_name} "
                                  f"or another checkpoint directory")
        with expert._lock:
            expert.module.load_state_dict(state["module"])
            if expert.optimizer is not None:
                expert.optimizer.load_state_dict(state["optimizer"])
            expert.updates = int(state["updates"])
        loaded.append(expert.name)
    if loaded:
        logger.info("resumed %d experts from their checkpoints in %s", len(loaded), directory,
                    extra={"event": "checkpoint_resumed"})
    return loaded

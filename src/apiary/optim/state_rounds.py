"""State rounds: every few epochs the peers average their state, at once or overlapped with training.

A state round averages a peer's state (`run_state`: the rule's synced parameters, then its
optimizer's statistics) with its group's, which undoes drift (a round a peer missed, an update
it made alone). Plain, the training thread waits for the round and takes the mean.

Delayed (`delay_state_averaging`), the round averages a snapshot in the background while the
next batches are trained; when it ends, the peer takes the mean plus the progress it made since
the snapshot (the delta rule: new = averaged + (current - snapshot)), so no local update is lost,
and peers that made the same updates meanwhile (the same averaged gradients) end with the same
state. The snapshot is taken once the epoch's own update has landed (with delayed updates the
rule applies it on the training thread when its round ends), so the state averaged includes it
as without overlap; the round starts at the latest when the next epoch ends, before that
epoch's gradient round, so every peer sends its rounds to its averager in the same order. A
state round still running when the next one is due is awaited first. The delta on optimizer
statistics is the same rule: a statistic that must stay positive (Adam's second moment) could
only turn negative if this peer's value were many times its group's mean.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from apiary.averaging.averager import STATE_ROUNDS
from apiary.optim.rules import RoundFuture, Rounds, UpdateRule
from apiary.optim.state import run_state

logger = logging.getLogger(__name__)


@dataclass
class _Running:
    future: RoundFuture
    epoch: int
    averaged: list[torch.Tensor]  # the round's buffers: the snapshot, averaged in place
    snapshot: list[torch.Tensor] | None  # delayed: the state when the round started


class StateRounds:
    """The state rounds of `rule` through `rounds`, overlapped with training when `delayed`."""

    def __init__(self, rule: UpdateRule, rounds: Rounds, delayed: bool):
        self.rule, self.rounds, self.delayed = rule, rounds, delayed
        self._due: int | None = None  # delayed: the epoch of a round to start once the rule's update landed
        self._running: _Running | None = None

    @property
    def pending(self) -> bool:
        """A round is due or running."""
        return self._due is not None or self._running is not None

    def due(self, epoch: int) -> None:
        """Epoch `epoch` averages the state: now (the rule's pending update applied first), or delayed,
        in the background as soon as the rule's update has landed."""
        self.flush()
        if self.delayed:
            self._due = epoch
            self.poll()
            return
        self.rule.flush()
        self._start(epoch)
        self.flush()

    def poll(self) -> None:
        """Starts a due round once the rule has no update pending; takes a finished round's state."""
        if self._due is not None and not self.rule.pending:
            self._start(self._due)
        if self._running is not None and self._running.future.done():
            self.flush()

    def settle(self) -> None:
        """Before the next epoch ends: a round still due starts now (the rule's update applied first)."""
        if self._due is not None:
            self.rule.flush()
            self._start(self._due)

    def flush(self) -> None:
        """Waits for the running round and takes its state (nothing if it found no group or failed)."""
        running, self._running = self._running, None
        if running is None or not self.rounds.result(running.future, f"the state round of epoch {running.epoch}"):
            return
        _, tensors = run_state(self.rule, running.epoch)
        if [t.shape for t in tensors] != [t.shape for t in running.averaged]:
            logger.warning("the state changed its layout during the state round of epoch %d: its mean is not taken",
                           running.epoch)
            return
        if running.snapshot is not None:  # the delta rule: the progress made meanwhile is kept
            with torch.no_grad():
                for averaged, current, before in zip(running.averaged, tensors, running.snapshot):
                    averaged.add_(current.detach().to(averaged.device, averaged.dtype)).sub_(before)
        self.rule.take(tensors, running.averaged)

    def drop(self) -> None:
        """Forgets a due or running round (the peer takes a whole state from elsewhere)."""
        self._due = self._running = None

    def _start(self, epoch: int) -> None:
        self._due = None
        _, tensors = run_state(self.rule, epoch)
        with torch.no_grad():
            averaged = [t.detach().clone() for t in tensors]
            snapshot = [t.clone() for t in averaged] if self.delayed else None
        self._running = _Running(self.rounds.start(averaged, 1.0, STATE_ROUNDS + epoch), epoch, averaged, snapshot)

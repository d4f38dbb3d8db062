"""How the model is updated at the end of an epoch: one class per update rule.

- `GradientAveraging` ("gradients"): accumulates each batch's gradients weighted by its samples;
  at the epoch's end averages the epoch's mean gradient with the peers (weighted by samples) and
  steps the wrapped optimizer on the result. With delayed updates the round runs in the
  background and its step lands when it finishes (one epoch stale). With reused gradient
  buffers there is no accumulator: the user's `.grad` sums the batches' gradients and the
  epoch's gradient is that sum over the number of batches (each batch weighs the same). With an
  offloaded optimizer the wrapped optimizer owns CPU copies of the parameters (`masters`): the
  averaged gradient is copied to them, it steps there, and the parameters are copied back.
- `LocalSGD` ("local"): the wrapped optimizer steps on every batch; at the epoch's end the peers
  average their parameters (an outer step of rate 1 on the mean of start-minus-current).
- `DiLoCo` ("diloco"): the wrapped optimizer is the inner one, stepping on every batch; at the
  epoch's end the peers average their pseudo-gradients (parameters at the epoch's start minus
  the current ones) and an outer Nesterov SGD applies the mean. A peer that joined mid-epoch
  contributes nothing to that epoch's round.

A rule owns its buffers and reaches the swarm only through `Rounds`, so it runs on plain tensors
in tests. Its `synced()` tensors define the run's state (saved, served to newcomers, averaged).
`PowerSGD` ("powersgd", optim/powersgd.py) is one more subclass: gradient averaging through
low-rank factors with error feedback, two rounds per epoch.
"""

from __future__ import annotations

import abc
import concurrent.futures
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch

RoundFuture = concurrent.futures.Future  # of the round's RoundGroup, or None when no group was found


@dataclass(frozen=True)
class RoundGroup:
    """The group a round averaged in: its size and its peers' ids, sorted (none when the averager
    does not report them: one older than the field)."""

    size: int
    members: tuple[str, ...] = ()


class Rounds(Protocol):
    """Averaging rounds with the swarm, run in the background."""

    def start(self, tensors: list[torch.Tensor], weight: float, round_index: int) -> RoundFuture:
        """Starts averaging `tensors` in place (weighted by `weight`) in round `round_index`."""
        ...

    def result(self, future: RoundFuture, what: str) -> RoundGroup | None:
        """Waits for a round: its group, or None (no group, or it failed: tensors unchanged)."""
        ...


Mode = Literal["gradients", "local", "diloco", "powersgd"]
MODES = ("gradients", "local", "diloco", "powersgd")  # powersgd: optim/powersgd.py


def check_mode(mode: str, *, delay_updates: bool = False, auxiliary: bool = False, reuse_grad_buffers: bool = False,
               offload_optimizer: bool = False, delay_state_averaging: bool = False,
               average_state_every: int | None = None) -> None:
    """Raises ValueError naming the option when `mode` is unknown or does not go with an option."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if delay_updates and mode != "gradients":
        raise ValueError("delay_updates applies to mode='gradients' only")
    if auxiliary and mode != "gradients":
        raise ValueError("auxiliary peers assist gradient rounds: mode must be 'gradients'")
    if (reuse_grad_buffers or offload_optimizer) and mode != "gradients":
        raise ValueError("reuse_grad_buffers and offload_optimizer apply to mode='gradients' only (in 'local' "
                         "and 'diloco' the wrapped optimizer steps every batch on the device; 'powersgd' keeps "
                         "buffers of its own)")
    if reuse_grad_buffers and delay_updates:
        raise ValueError("reuse_grad_buffers cannot be combined with delay_updates: the next epoch's gradients "
                         "would accumulate in the buffers the delayed round still averages")
    if delay_state_averaging:
        _check_delayed_state(mode, auxiliary, average_state_every)


def _check_delayed_state(mode: str, auxiliary: bool, average_state_every: int | None) -> None:
    if mode not in ("gradients", "powersgd"):
        raise ValueError("delay_state_averaging applies to mode='gradients' or 'powersgd' only (in 'local' and "
                         "'diloco' taking a state restarts the inner steps from it: the progress made while the "
                         "state round ran could not be kept)")
    if auxiliary:
        raise ValueError("delay_state_averaging does not apply to auxiliary peers: they hold no state to average")
    if average_state_every == 0:
        raise ValueError("delay_state_averaging needs state rounds: average_state_every is 0 (never)")


class UpdateRule(abc.ABC):
    """Steps the wrapped `optimizer` of `params` as the rule says; steps `scheduler` after each update."""

    mode: ClassVar[str]

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 scheduler: Any | None, rounds: Rounds):
        self.params = params
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.rounds = rounds

    @abc.abstractmethod
    def on_batch(self, batch_size: int) -> None:
        """Takes the gradients of a local batch of `batch_size` samples."""

    @abc.abstractmethod
    def finish_epoch(self, epoch: int, samples: int) -> None:
        """Averages this epoch's contribution (`samples` accumulated here) with the swarm and updates."""

    def round_template(self) -> list[torch.Tensor]:
        """Shaped like the tensors of the epoch's (first) round, which groups are formed ahead for."""
        return list(self.params)

    def poll(self) -> None:
        """Applies an update whose background round has finished (delayed updates)."""

    @property
    def pending(self) -> bool:
        """An update is still to be applied (its round runs in the background)."""
        return False

    def flush(self) -> None:
        """Waits for a pending update and applies it."""

    def drop(self) -> None:
        """The swarm moved on without this peer: forget its contribution to the epoch."""

    def close(self) -> None:
        """Releases what the rule attached to the parameters (gradient hooks)."""

    def synced(self) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        """The optimizer whose state defines the run, and its parameters."""
        return self.optimizer, list(self.params)

    def take(self, destinations: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        """Copies `values` into synced tensors (parameters, then optimizer statistics)."""
        with torch.no_grad():
            for destination, value in zip(destinations, values):
                destination.copy_(value)

    def _updated(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()


class GradientAveraging(UpdateRule):
    mode = "gradients"

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 scheduler: Any | None, rounds: Rounds, delay_updates: bool = False, reuse_grad_buffers: bool = False,
                 masters: list[torch.Tensor] | None = None):
        super().__init__(params, optimizer, scheduler, rounds)
        check_mode(self.mode, delay_updates=delay_updates, reuse_grad_buffers=reuse_grad_buffers)
        self.delay_updates = delay_updates
        self.reuse_grad_buffers = reuse_grad_buffers
        self.masters = masters if masters is not None else list(params)  # what the wrapped optimizer steps
        # sum over batches of gradient x samples (reused buffers: the user's .grad sums the batches' gradients)
        self.accumulated = [] if reuse_grad_buffers else [torch.zeros_like(p) for p in params]
        self.batches = 0
        # reuse: each .grad seen at the previous batch and its version then, and the accumulations since
        self._accumulating: list[tuple[torch.Tensor, int] | None] = [None] * len(params)
        self._accumulations = [0] * len(params)
        self._hooks = [p.register_post_accumulate_grad_hook(functools.partial(self._accumulated, i))
                       for i, p in enumerate(params)] if reuse_grad_buffers else []
        self._pending: tuple[RoundFuture, list[torch.Tensor], int] | None = None

    def on_batch(self, batch_size: int) -> None:
        if self.reuse_grad_buffers:
            self._check_accumulating()
        else:
            with torch.no_grad():
                for buffer, p in zip(self.accumulated, self.params):
                    if p.grad is not None:
                        buffer.add_(p.grad, alpha=batch_size)
        self.batches += 1

    def _accumulated(self, index: int, param: torch.Tensor) -> None:
        self._accumulations[index] += 1

    def _check_accumulating(self) -> None:
        """Reused buffers: each .grad must be the tensor seen at the previous batch, changed only by
        the backward passes since (each adds to it in place: one version each); a tensor replaced or
        gone, or changed otherwise (zeroed in place), means the gradients were reset between steps."""
        for index, (p, seen) in enumerate(zip(self.params, self._accumulating)):
            if seen is not None and (p.grad is not seen[0] or p.grad._version - seen[1] != self._accumulations[index]):
                raise RuntimeError("reuse_grad_buffers=True accumulates the epoch's gradients in .grad, but they were "
                                   "reset since the previous step (zero_grad?): do not zero gradients between steps "
                                   "(the optimizer clears them after each epoch), or pass reuse_grad_buffers=False")
        self._accumulating = [(p.grad, p.grad._version) if p.grad is not None else None for p in self.params]
        self._accumulations = [0] * len(self.params)

    def finish_epoch(self, epoch: int, samples: int) -> None:
        with torch.no_grad():
            if self.reuse_grad_buffers:  # averaged in place: no model-sized copy
                grads = [p.grad.div_(max(self.batches, 1)) if p.grad is not None else torch.zeros_like(p)
                         for p in self.params]
            else:
                grads = [buffer / max(samples, 1) for buffer in self.accumulated]
        self.drop()
        self.flush()
        self._pending = (self.rounds.start(grads, float(samples), epoch), grads, epoch)
        if not self.delay_updates:
            self.flush()

    def poll(self) -> None:
        if self._pending is not None and self._pending[0].done():
            self.flush()

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def flush(self) -> None:
        """Steps with the averaged gradients (own gradients if the round found no group or failed)."""
        if self._pending is None:
            return
        future, grads, epoch = self._pending
        self._pending = None
        self.rounds.result(future, f"the gradient round of epoch {epoch}")
        with torch.no_grad():
            for p, master, g in zip(self.params, self.masters, grads):
                master.grad = g.to(master.device, master.dtype)
                if master is not p:
                    p.grad = None  # offloaded: the device's gradients are no longer needed
            del grads
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            for p in self.params:
                p.grad = None
            self._copy_masters(to_params=True)
        self._updated()

    def drop(self) -> None:
        for buffer in self.accumulated:
            buffer.zero_()
        if self.reuse_grad_buffers:
            for p in self.params:
                p.grad = None
            self._accumulating = [None] * len(self.params)
        self.batches = 0

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def take(self, destinations: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        super().take(destinations, values)
        with torch.no_grad():
            self._copy_masters(to_params=False)

    def _copy_masters(self, to_params: bool) -> None:
        """An offloaded optimizer's parameters to the model's (after a step) or back (after a state was taken)."""
        for p, master in zip(self.params, self.masters):
            if master is p:
                continue
            if to_params:
                p.copy_(master)
            else:
                master.copy_(p)


class LocalSGD(UpdateRule):
    """Also the base of DiLoCo: inner steps every batch, an outer SGD step on the mean pseudo-gradient."""

    mode = "local"
    lr, momentum = 1.0, 0.0  # outer parameters minus the mean of (outer - current): the mean parameters

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 scheduler: Any | None, rounds: Rounds):
        super().__init__(params, optimizer, scheduler, rounds)
        self.outer_params = [p.detach().clone().requires_grad_(True) for p in params]  # at the epoch's start
        self.outer = torch.optim.SGD(self.outer_params, lr=self.lr, momentum=self.momentum,
                                     nesterov=self.momentum > 0)

    def on_batch(self, batch_size: int) -> None:
        self.optimizer.step()

    def finish_epoch(self, epoch: int, samples: int) -> None:
        deltas, weight = self._contribution(samples)
        self.rounds.result(self.rounds.start(deltas, weight, epoch), f"the {self.mode} round of epoch {epoch}")
        with torch.no_grad():
            for outer, delta in zip(self.outer_params, deltas):
                outer.grad = delta
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        self._restart()
        self._updated()

    def _contribution(self, samples: int) -> tuple[list[torch.Tensor], float]:
        """This peer's pseudo-gradients and their weight."""
        with torch.no_grad():
            return [outer - p.detach() for outer, p in zip(self.outer_params, self.params)], float(samples)

    def synced(self) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        return self.outer, list(self.outer_params)

    def take(self, destinations: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        super().take(destinations, values)
        self._restart()

    def _restart(self) -> None:
        """The model's parameters restart from the outer ones."""
        with torch.no_grad():
            for p, outer in zip(self.params, self.outer_params):
                p.copy_(outer)


class DiLoCo(LocalSGD):
    mode = "diloco"

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 scheduler: Any | None, rounds: Rounds, outer_lr: float = 0.7, outer_momentum: float = 0.9):
        self.lr, self.momentum = outer_lr, outer_momentum
        super().__init__(params, optimizer, scheduler, rounds)
        self._joined_mid_epoch = False

    def _contribution(self, samples: int) -> tuple[list[torch.Tensor], float]:
        deltas, weight = super()._contribution(samples)
        if self._joined_mid_epoch:  # what it computed since it joined is not an epoch's worth
            self._joined_mid_epoch = False
            return [torch.zeros_like(delta) for delta in deltas], 0.0
        return deltas, weight

    def drop(self) -> None:
        self._joined_mid_epoch = True

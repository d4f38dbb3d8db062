"""`apiary.Optimizer`: many peers train one model as if it were one large-batch run.

Wrap any torch optimizer; call `step(batch_size)` after every local backward pass. The peers of
a run (`run_id`) publish their progress in the DHT; when the samples the swarm accumulated reach
`target_batch_size`, every peer finishes the epoch together and updates the model by the rule
`mode` names (optim/rules.py): "gradients" (average the gradients, then step; optionally delayed
by an epoch), "local" (local SGD, parameters averaged), "diloco" (outer Nesterov SGD on the
mean pseudo-gradient) or "powersgd" (gradients averaged as rank-`powersgd_rank` factors with
error feedback, tensors under `powersgd_min_size` elements uncompressed: optim/powersgd.py).
In "gradients" and "powersgd" modes parameters and optimizer statistics are averaged every
`average_state_every` epochs to undo any drift (e.g. a round a peer missed): the training
thread waits for that round, or with `delay_state_averaging` it runs in the background while the
next batches are trained and its mean lands with the progress made meanwhile kept
(optim/state_rounds.py); with `delay_updates` either waits for the epoch's update to land first.

Memory (mode "gradients"): `reuse_grad_buffers` accumulates in the parameters' `.grad` instead
of a separate buffer (do not zero gradients between steps: the optimizer does after each epoch,
and raises if they were reset); `offload_optimizer` keeps the wrapped optimizer, its statistics
and its step on CPU copies of the parameters (parameters already on CPU are used as they are).

This class is the façade: the epoch controller (optim/epochs.py) decides when an epoch ends,
whom to follow and when the averager forms a group ahead, from frozen snapshots (this peer's
`LocalProgress`, replaced by the training thread after every batch; the swarm's `SwarmProgress`,
replaced after every refresh); the rule updates; the `Swarm` (optim/swarm.py) carries progress,
rounds and state. A peer that starts late or falls behind loads the newest state from its peers;
a peer that finds no group applies its own update and carries on.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from apiary.background import LoopThread
from apiary.optim.epochs import EpochController, LocalProgress, Step
from apiary.optim.powersgd import PowerSGD
from apiary.optim.progress import SwarmProgress
from apiary.optim.rounds import SwarmRounds
from apiary.optim.rules import DiLoCo, GradientAveraging, LocalSGD, Mode, UpdateRule, check_mode
from apiary.optim.state import load_run_state, parameters_of, run_state
from apiary.optim.state_rounds import StateRounds
from apiary.optim.swarm import StartEmbedded, Swarm, SwarmLink
from apiary.optim.watch import SwarmWatch, logged
from apiary.wire import Endpoint, PeerAddress, WireSettings

logger = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def offloaded(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """The CPU parameter an offloaded optimizer steps for `param` (`param` itself if on CPU)."""
    if param.device.type == "cpu":
        return param
    return torch.nn.Parameter(param.detach().to("cpu", copy=True))


class Optimizer:
    """A collaborative optimizer for run `run_id` (see the module docstring). It uses the
    participant's dht and averager services when given their local APIs, else starts embedded
    ones joining `initial_peers` (none: a new swarm); `swarm`, when given, replaces both.

        opt = apiary.Optimizer("my-run", model.parameters(), lambda p: torch.optim.Adam(p, 1e-3),
                               target_batch_size=4096, initial_peers=["<peer>@host:port"])
        for x, y in data:
            loss_fn(model(x), y).backward()
            opt.step(batch_size=len(x))
            opt.zero_grad()
        opt.close()

    `apiary.Optimizer` starts the embedded services (`start_embedded`); this class, in a layer
    below the services, links only to running ones unless a subclass sets `start_embedded`.
    """

    start_embedded: StartEmbedded | None = None

    def __init__(
        self, run_id: str, params: Iterable[torch.nn.Parameter], optimizer: OptimizerFactory, *,
        target_batch_size: int, mode: Mode = "gradients", dht_local: Endpoint | str | None = None,
        averager_local: Endpoint | str | None = None, initial_peers: Sequence[PeerAddress | str] = (),
        client_mode: bool = False, auxiliary: bool = False, wire: WireSettings | None = None,
        identity: Path | None = None, averaging: dict[str, Any] | None = None, average_state_every: int = 5,
        delay_updates: bool = False, reuse_grad_buffers: bool = False, offload_optimizer: bool = False,
        delay_state_averaging: bool = False, outer_lr: float = 0.7, outer_momentum: float = 0.9,
        powersgd_rank: int = 4, powersgd_min_size: int = 4096,
        scheduler: SchedulerFactory | None = None, load_state: bool = True, state_timeout: float = 30.0,
        round_timeout: float = 60.0, refresh_period: float = 0.25, max_samples_per_second: float = math.inf,
        swarm: Swarm | None = None,
    ):
        check_mode(mode, delay_updates=delay_updates, auxiliary=auxiliary, reuse_grad_buffers=reuse_grad_buffers,
                   offload_optimizer=offload_optimizer, delay_state_averaging=delay_state_averaging,
                   average_state_every=average_state_every)
        if target_batch_size < 1:
            raise ValueError(f"target_batch_size must be at least 1, got {target_batch_size}")
        if average_state_every < 0:
            raise ValueError(f"average_state_every must be 0 (never) or more, got {average_state_every}")
        self.run_id, self.mode, self.auxiliary = run_id, mode, auxiliary
        self.target_batch_size = target_batch_size
        self.average_state_every = average_state_every
        self.delay_updates = delay_updates
        self.reuse_grad_buffers = reuse_grad_buffers
        self.state_timeout = state_timeout
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("the optimizer was given no parameters that require gradients")
        masters = [offloaded(p) for p in self.params] if offload_optimizer else self.params
        self.optimizer = optimizer(masters)
        self.controller = EpochController(target_batch_size, refresh_period)
        self.local = LocalProgress(epoch=0)  # replaced (never changed) by the training thread
        self.history: list[dict[str, Any]] = []  # per finished epoch: samples contributed, the round's group and wait
        self._last_step: float | None = None
        self.loop = LoopThread(f"apiary-optimizer-{run_id}")
        try:
            if swarm is None:
                swarm = self.loop.run(SwarmLink.open(
                    run_id, dht_local, averager_local, self.start_embedded, initial_peers, round_timeout=round_timeout,
                    max_samples_per_second=max_samples_per_second, averaging=averaging, client_mode=client_mode,
                    auxiliary=auxiliary, wire=wire, identity=identity), timeout=120)
            self.swarm = swarm
            self.watch = SwarmWatch(self.loop, swarm, self.controller, lambda: self.local, self.params)
            self._rounds = SwarmRounds(self.loop, swarm, round_timeout,
                                       alone=lambda: self.view is not None and self.view.peers <= 1)
            schedule = scheduler(self.optimizer) if scheduler is not None else None
            common = (self.params, self.optimizer, schedule, self._rounds)
            self.rule: UpdateRule = (GradientAveraging(*common, delay_updates=delay_updates, masters=masters,
                                                       reuse_grad_buffers=reuse_grad_buffers) if mode == "gradients"
                                     else LocalSGD(*common) if mode == "local"
                                     else PowerSGD(*common, rank=powersgd_rank, min_size=powersgd_min_size,
                                                   seed=zlib.crc32(run_id.encode())) if mode == "powersgd"
                                     else DiLoCo(*common, outer_lr=outer_lr, outer_momentum=outer_momentum))
            self.watch.params = self.rule.round_template()  # groups formed ahead are for the first round's tensors
            self.state_rounds = StateRounds(self.rule, self._rounds, delayed=delay_state_averaging)
            if load_state and not auxiliary:
                self.load_state_from_peers()
            if not auxiliary:
                self._publish_state()
            self.loop.run(swarm.register(self.watch.params), timeout=60)  # the gradient rounds' schema
            self.watch.start()
        except BaseException:
            self.loop.stop()
            raise

    # ---- the training thread's side

    def step(self, batch_size: int, grad_scaler: torch.amp.GradScaler | None = None) -> bool:
        """Takes this peer's gradients of a batch of `batch_size` samples; returns True when the
        swarm's epoch advanced (an update was applied). With `grad_scaler`, the gradients are
        unscaled first, and a batch with inf/NaN gradients is skipped (the scale adapts)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if grad_scaler is not None and (self.reuse_grad_buffers or self.optimizer_offloaded):
            raise ValueError("grad_scaler cannot be combined with reuse_grad_buffers or offload_optimizer: "
                             "unscale the gradients before step() instead")
        if grad_scaler is not None and not self._unscale(grad_scaler):
            return False
        self._count(batch_size)
        self.rule.on_batch(batch_size)
        self.rule.poll()
        self.state_rounds.poll()
        decide = self.controller.after_batch
        decision = decide(self.local, self.view, self.watch.prepared_epoch, time.monotonic(), fresh=False)
        if decision.step is Step.REFRESH:  # the estimate reached the target: decide on counts reported just now
            decision = decide(self.local, self.refresh(), self.watch.prepared_epoch, time.monotonic(), fresh=True)
        if decision.step is Step.FINISH:
            self._finish_epoch()
        elif decision.step is Step.CATCH_UP:
            self._catch_up(decision.epoch)
        return decision.step in (Step.FINISH, Step.CATCH_UP)

    def refresh(self) -> SwarmProgress | None:
        """Publishes this peer's progress and reads the swarm's now; the latest view."""
        return self.watch.refresh()

    def assist(self, stop: threading.Event, max_epochs: int = 0) -> None:
        """An auxiliary peer's work instead of training: joins every gradient round of the swarm
        (reducing others' parts, contributing none) until `stop` is set or `max_epochs` is reached."""
        if not self.auxiliary:
            raise RuntimeError("assist() is for auxiliary peers (Optimizer(..., auxiliary=True))")
        nothing = [torch.zeros_like(p) for p in self.params]
        while not stop.is_set() and not (max_epochs and self.epoch >= max_epochs):
            view = self.refresh()
            epoch, join = self.controller.assist(self.epoch, view, self.watch.prepared_epoch)
            if epoch != self.epoch:
                self._advance(epoch)
            if join and view is not None:
                self.history.append({"epoch": epoch, "samples": 0, "others": view.reported, "time": time.time()})
                self._rounds.result(self._rounds.start(nothing, 0.0, epoch), f"the auxiliary round of epoch {epoch}")
                self._advance(epoch + 1)
                self._resume()
            else:
                stop.wait(self.controller.refresh_interval(self.local, self.view, time.monotonic()))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the parameters' gradients (refused with reuse_grad_buffers: the optimizer clears them)."""
        if self.reuse_grad_buffers:
            raise RuntimeError("with reuse_grad_buffers=True gradients accumulate in .grad across steps: do not "
                               "zero them (the optimizer clears them after each epoch)")
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_().zero_()

    @property
    def optimizer_offloaded(self) -> bool:
        """The wrapped optimizer steps CPU copies of (some of) the parameters."""
        return any(master is not p for master, p in zip(parameters_of(self.optimizer), self.params))

    def _unscale(self, scaler: torch.amp.GradScaler) -> bool:
        scaler.unscale_(self.optimizer)
        finite = all(bool(torch.isfinite(p.grad).all()) for p in self.params if p.grad is not None)
        scaler.update()  # lowers the scale after an overflow, raises it after a run of good steps
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
        return finite

    def _count(self, batch_size: int) -> None:
        now = time.monotonic()
        self.local = self.local.counted(batch_size, now - self._last_step if self._last_step is not None else None)
        self._last_step = now

    def _finish_epoch(self) -> None:
        local = self.local
        others = self.view.reported if self.view is not None else 0.0
        entry = {"epoch": local.epoch, "samples": local.samples, "others": others, "time": time.time()}
        self.history.append(entry)
        self.local = replace(local, training=False)
        self.watch.publish(self.local)  # our final count, and that we stopped counting
        started = time.monotonic()
        self.state_rounds.settle()
        self.rule.finish_epoch(local.epoch, local.samples)
        if not self.delay_updates:  # how long training waited for the round; its group, formed ahead or not
            outcome = self._rounds.last_outcome
            entry.update(round_seconds=time.monotonic() - started, group_size=outcome.group_size if outcome else 0,
                         formed_early=bool(outcome and outcome.formed_early))
        self._advance(local.epoch + 1)
        if self.average_state_every and self.epoch % self.average_state_every == 0:
            self.state_rounds.due(self.epoch)  # the state averaged includes this epoch's update
        self._resume()
        self._publish_state()

    def _catch_up(self, swarm_epoch: int) -> None:
        """The swarm moved on without us: load its state, drop what we accumulated, follow it."""
        logger.info("peer is at epoch %d, the swarm at %d: loading the state from peers", self.epoch, swarm_epoch)
        if self.watch.prepared_epoch == self.epoch:  # its group counts on us: take part, contributing nothing
            nothing = [torch.zeros_like(t) for t in self.watch.params]
            self.loop.submit(logged(self._rounds.average(nothing, 0.0, self.epoch), "a promised round"))
        self.local = replace(self.local, training=False)
        self.rule.flush()
        self.rule.drop()
        self.state_rounds.drop()
        if not self.load_state_from_peers() or self.epoch < swarm_epoch:
            self._advance(swarm_epoch)
        self._resume()

    def _advance(self, epoch: int) -> None:
        self.local = replace(self.local, epoch=epoch, samples=0)

    def _resume(self) -> None:
        """Back to training: tell the swarm at once (new epoch, throughput again)."""
        self._last_step = None
        self.local = replace(self.local, training=True)
        self.watch.publish(self.local)

    # ---- state

    def state(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """(metadata, tensors) of this peer's state: parameters, then optimizer statistics."""
        return run_state(self.rule, self.epoch)

    def load_state(self, metadata: dict[str, Any], tensors: Sequence[torch.Tensor]) -> None:
        """Takes a state given by `state()` (this peer's or another's); raises ValueError if it does not fit.
        A delayed state round still running is forgotten."""
        self.state_rounds.drop()
        self._advance(max(self.epoch, load_run_state(self.rule, metadata, tensors)))

    def load_state_from_peers(self) -> bool:
        """Downloads the newest state any peer gives and takes it; False if none came or it did not fit."""
        loaded = self.loop.run(self.swarm.load_state(self.state_timeout), timeout=self.state_timeout + 30)
        if loaded is None:
            return False
        try:
            self.load_state(*loaded)
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("the state from peers does not fit this model: %s", e)
            return False
        logger.info("loaded the swarm's state of epoch %d", self.epoch)
        return True

    def _publish_state(self) -> None:
        """Hands a copy of the state to the averager, which serves it to newcomers (not from clients)."""
        if self.swarm.client_mode:
            return
        metadata, tensors = self.state()
        copies = [t.detach().to("cpu", copy=True) for t in tensors]
        self.loop.submit(logged(self.swarm.publish_state(metadata, copies), "publishing the state"))

    # ---- reporting and shutdown

    @property
    def epoch(self) -> int:
        return self.local.epoch

    @property
    def samples(self) -> int:
        """Accumulated toward the current epoch by this peer."""
        return self.local.samples

    @property
    def samples_per_second(self) -> float:
        return self.local.samples_per_second

    @property
    def rounds(self) -> dict[str, int]:
        """How many rounds found a group ("ok") and how many did not ("no_group")."""
        return self._rounds.counts

    @property
    def view(self) -> SwarmProgress | None:
        """The swarm's progress, as last read."""
        return self.watch.view

    @property
    def swarm_epoch(self) -> int:
        return max(self.epoch, self.view.epoch if self.view is not None else 0)

    @property
    def peers(self) -> int:
        return self.view.peers if self.view is not None else 1

    def close(self) -> None:
        """Applies a pending update (and a running state round's mean), stops the background work
        and, if embedded, the services."""
        try:
            self.rule.flush()
            self.state_rounds.flush()
        finally:
            self.rule.close()
            try:
                self.watch.stop()
                self.loop.run(self.swarm.close(), timeout=30)
            finally:
                self.loop.stop()

    def __enter__(self) -> Optimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""`apiary.Optimizer`: many peers train one model as if it were one large-batch run.

Wrap any torch optimizer; call `step(batch_size)` after every local backward pass. The peers
of a run (`run_id`) publish their progress in the DHT; when the samples the swarm accumulated
reach `target_batch_size`, every peer finishes the epoch together:

- `mode="gradients"` (default): each peer averages its accumulated gradients with the others
  (weighted by samples, so the result is the gradient of the whole global batch), then runs the
  wrapped optimizer's step. Parameters and optimizer statistics are averaged every
  `average_state_every` epochs to undo any drift (e.g. a round a peer missed).
- `mode="local"`: the wrapped optimizer steps on every local batch (local SGD); at each epoch the
  peers average their parameters.
- `mode="diloco"`: the wrapped optimizer is DiLoCo's inner optimizer, stepping on every local
  batch; at each epoch the peers average their pseudo-gradients (the parameters at the start
  of the epoch minus the current ones) and an outer Nesterov SGD applies the mean.

A peer that starts late, or finds the swarm's epoch ahead of its own, loads the newest state
from its peers first. With `delay_updates`, a gradient round runs in the background while the
next batches are computed, and its step is applied when it finishes (one epoch stale).
A peer that fails to find a group applies its own update and carries on: a dead or slow peer
never stops the others. When the swarm's estimated end of the epoch is as near as the
averager's matchmaking time, the peer has its averager form the epoch's group ahead, so the
round at the end goes straight to the all-reduce.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from apiary.averaging.local import Outcome
from apiary.background import LoopThread
from apiary.optim.progress import ProgressTracker, SwarmProgress
from apiary.optim.state import load_optimizer_statistics, optimizer_statistics
from apiary.optim.swarm import EmbeddedServices, SwarmLink
from apiary.wire import Endpoint, PeerAddress, WireSettings

logger = logging.getLogger(__name__)

Mode = Literal["gradients", "local", "diloco"]
MODES = ("gradients", "local", "diloco")
OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
NEAR_END = 0.8  # past this share of the target (estimated), the swarm's counts are read every FINAL_REFRESH s
FINAL_REFRESH = 0.05
STATE_ROUNDS = 1 << 32  # state rounds are numbered apart from the epochs' gradient rounds


class StartEmbedded(Protocol):
    """Starts a participant's dht and averager services in this process (`apiary.services.embedded`)."""

    def __call__(self, run_id: str, initial_peers: Sequence[PeerAddress], *, averaging: dict[str, Any] | None,
                 client_mode: bool, auxiliary: bool, wire: WireSettings | None,
                 identity: Path | None) -> Awaitable[EmbeddedServices]: ...


class Optimizer:
    """A collaborative optimizer for run `run_id` (see the module docstring). It uses the
    participant's dht and averager services when given their local APIs, else starts embedded
    ones joining `initial_peers` (none: a new swarm).

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
        self,
        run_id: str,
        params: Iterable[torch.nn.Parameter],
        optimizer: OptimizerFactory,
        *,
        target_batch_size: int,
        mode: Mode = "gradients",
        dht_local: Endpoint | str | None = None,
        averager_local: Endpoint | str | None = None,
        initial_peers: Sequence[PeerAddress | str] = (),
        client_mode: bool = False,
        auxiliary: bool = False,
        wire: WireSettings | None = None,
        identity: Path | None = None,
        averaging: dict[str, Any] | None = None,
        average_state_every: int = 5,
        delay_updates: bool = False,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        scheduler: SchedulerFactory | None = None,
        load_state: bool = True,
        state_timeout: float = 30.0,
        round_timeout: float = 60.0,
        refresh_period: float = 0.25,
        max_samples_per_second: float = math.inf,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if target_batch_size < 1:
            raise ValueError(f"target_batch_size must be at least 1, got {target_batch_size}")
        if average_state_every < 0:
            raise ValueError(f"average_state_every must be 0 (never) or more, got {average_state_every}")
        if delay_updates and mode != "gradients":
            raise ValueError("delay_updates applies to mode='gradients' only")
        if auxiliary and mode != "gradients":
            raise ValueError("auxiliary peers assist gradient rounds: mode must be 'gradients'")
        self.auxiliary = auxiliary
        self.run_id = run_id
        self.mode = mode
        self.target_batch_size = target_batch_size
        self.average_state_every = average_state_every
        self.delay_updates = delay_updates
        self.round_timeout = round_timeout
        self.state_timeout = state_timeout
        self.refresh_period = refresh_period
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("the optimizer was given no parameters that require gradients")
        self.optimizer = optimizer(self.params)
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None
        self.outer: torch.optim.Optimizer | None = None
        self.outer_params: list[torch.Tensor] = []
        if mode != "gradients":  # the parameters at the start of the epoch, and the outer optimizer on them
            self.outer_params = [p.detach().clone().requires_grad_(True) for p in self.params]
            lr, momentum = (1.0, 0.0) if mode == "local" else (outer_lr, outer_momentum)
            self.outer = torch.optim.SGD(self.outer_params, lr=lr, momentum=momentum, nesterov=momentum > 0)
        self.accumulated = [torch.zeros_like(p) for p in self.params] if mode == "gradients" else []
        self.epoch = 0
        self.samples = 0  # accumulated toward the current epoch by this peer
        self.samples_per_second = 0.0
        self.view: SwarmProgress | None = None
        self.rounds = {"ok": 0, "no_group": 0}
        self.history: list[dict[str, Any]] = []  # per finished epoch: samples contributed, the round's group and wait
        self._zero_contribution = False  # diloco: a peer that joined mid-epoch contributes nothing once
        self._pending: tuple[concurrent.futures.Future[int | None], list[torch.Tensor]] | None = None
        self._last_step: float | None = None
        self._training = True  # False while averaging: the published throughput is then 0
        self._prepared_epoch = -1  # the latest epoch whose group the averager was asked to form ahead
        self._last_outcome: Outcome | None = None  # of the latest round
        self.loop = LoopThread(f"apiary-optimizer-{run_id}")
        try:
            if (dht_local is None) != (averager_local is None):
                raise ValueError("give both dht_local and averager_local (the participant's services), or neither")
            if dht_local is not None and averager_local is not None:
                link = SwarmLink.connect(dht_local, averager_local, round_timeout=round_timeout)
            elif self.start_embedded is None:
                raise ValueError("give dht_local and averager_local (the participant's services), or use "
                                 "apiary.Optimizer, which starts embedded ones")
            else:
                peers = [p if isinstance(p, PeerAddress) else PeerAddress.parse(p) for p in initial_peers]
                starting = self.start_embedded(run_id, peers, averaging=averaging, client_mode=client_mode,
                                               auxiliary=auxiliary, wire=wire, identity=identity)
                link = SwarmLink.embedded(starting, round_timeout=round_timeout)
            self.swarm = self.loop.run(link, timeout=120)
            self.tracker = ProgressTracker(self.swarm.dht, run_id, self.swarm.peer_id, client=self.swarm.client_mode,
                                           max_samples_per_second=max_samples_per_second)
            if load_state and not auxiliary:
                self.load_state_from_peers()
            if not auxiliary:
                self._publish_state()
            self.loop.run(self.swarm.register(self.params), timeout=60)  # the gradient rounds' schema
            self._refresher = self.loop.submit(self._refresh_loop())
        except BaseException:
            self.loop.stop()
            raise

    # ---- the training loop's side

    def step(self, batch_size: int, grad_scaler: torch.amp.GradScaler | None = None) -> bool:
        """Takes this peer's gradients of a batch of `batch_size` samples; returns True when the
        swarm's epoch advanced (an update was applied). With `grad_scaler`, the gradients are
        unscaled first, and a batch with inf/NaN gradients is skipped (the scale adapts)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if grad_scaler is not None and not self._unscale(grad_scaler):
            return False
        self._count(batch_size)
        if self.mode == "gradients":
            with torch.no_grad():
                for buffer, p in zip(self.accumulated, self.params):
                    if p.grad is not None:
                        buffer.add_(p.grad, alpha=batch_size)
        else:
            self.optimizer.step()
        self._apply_finished_round()
        view = self.view
        if view is not None and view.epoch > self.epoch:
            self._follow(view.epoch)
            return True
        # near the end the background refresh reads the swarm every FINAL_REFRESH seconds; once the
        # estimate reaches the target, the epoch ends on counts the peers reported just now
        if self.samples + (view.others_now() if view is not None else 0.0) < self.target_batch_size:
            return False
        view = self._refresh_now()
        if view is not None and view.epoch > self.epoch:
            self._follow(view.epoch)
            return True
        if self.samples + (view.reported if view is not None else 0.0) >= self.target_batch_size:
            self._finish_epoch()
            return True
        return False

    def _refresh_now(self) -> SwarmProgress | None:
        try:
            self.view = self.loop.run(self._refresh(), timeout=self.refresh_period * 4 + 5)
        except Exception as e:  # noqa: BLE001 - the next step tries again
            logger.warning("reading the swarm's progress failed: %s", e)
        return self.view

    def assist(self, stop: threading.Event, max_epochs: int = 0) -> None:
        """An auxiliary peer's work instead of training: joins every gradient round of the swarm
        (reducing others' parts, contributing none) until `stop` is set or `max_epochs` is reached."""
        if not self.auxiliary:
            raise RuntimeError("assist() is for auxiliary peers (Optimizer(..., auxiliary=True))")
        nothing = [torch.zeros_like(p) for p in self.params]
        while not stop.is_set() and not (max_epochs and self.epoch >= max_epochs):
            view = self._refresh_now()
            if view is not None and view.epoch > self.epoch and not self._awaited(view.epoch):
                self._advance(view.epoch)
            if view is not None and (view.reported >= self.target_batch_size or self._awaited(view.epoch)):
                self.history.append({"epoch": self.epoch, "samples": 0, "others": view.reported, "time": time.time()})
                self._result(self.loop.submit(self._average(nothing, 0.0, round_index=self.epoch)), "auxiliary")
                self._advance(self.epoch + 1)
                self._resume()
            else:
                stop.wait(self._refresh_interval())

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _unscale(self, scaler: torch.amp.GradScaler) -> bool:
        scaler.unscale_(self.optimizer)
        finite = all(bool(torch.isfinite(p.grad).all()) for p in self.params if p.grad is not None)
        scaler.update()  # lowers the scale after an overflow, raises it after a run of good steps
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
        return finite

    def _count(self, batch_size: int) -> None:
        now = time.monotonic()
        if self._last_step is not None and now > self._last_step:
            speed = batch_size / (now - self._last_step)
            self.samples_per_second = speed if self.samples_per_second == 0 else 0.8 * self.samples_per_second + 0.2 * speed
        self._last_step = now
        self.samples += batch_size

    # ---- epochs

    def _finish_epoch(self) -> None:
        samples = self.samples
        others = self.view.reported if self.view is not None else 0.0
        entry = {"epoch": self.epoch, "samples": samples, "others": others, "time": time.time()}
        self.history.append(entry)
        self._training = False
        self.loop.submit(self._publish_progress())  # our final count, and that we stopped counting
        started = time.monotonic()
        if self.mode == "gradients":
            grads = [buffer / max(samples, 1) for buffer in self.accumulated]
            for buffer in self.accumulated:
                buffer.zero_()
            self._wait_pending()
            future = self.loop.submit(self._average(grads, samples, round_index=self.epoch))
            self._pending = (future, grads)
            if not self.delay_updates:
                self._wait_pending()
        else:
            self._outer_step(samples)
        if not self.delay_updates:  # how long training waited for the round; its group, formed ahead or not
            outcome = self._last_outcome
            entry.update(round_seconds=time.monotonic() - started, group_size=outcome.group_size if outcome else 0,
                         formed_early=bool(outcome and outcome.formed_early))
        self._advance(self.epoch + 1)
        if self.average_state_every and self.epoch % self.average_state_every == 0 and not self.delay_updates:
            self._average_state()
        self._resume()
        self._publish_state()

    def _wait_pending(self) -> None:
        if self._pending is not None:
            self._apply(*self._pending, wait=True)

    def _apply_finished_round(self) -> None:
        if self._pending is not None and self._pending[0].done():
            self._apply(*self._pending, wait=False)

    def _apply(self, future: concurrent.futures.Future[int | None], grads: list[torch.Tensor], wait: bool) -> None:
        """Steps with the averaged gradients (own gradients if the round found no group or failed)."""
        self._pending = None
        size = self._result(future, "gradient")
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                p.grad = g.to(p.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._after_update()

    def _outer_step(self, samples: int) -> None:
        assert self.outer is not None
        with torch.no_grad():
            deltas = [outer - p.detach() for outer, p in zip(self.outer_params, self.params)]
            weight = float(samples)
            if self._zero_contribution:
                for delta in deltas:
                    delta.zero_()
                weight = 0.0
                self._zero_contribution = False
        size = self._result(self.loop.submit(self._average(deltas, weight, round_index=self.epoch)), "pseudo-gradient")
        with torch.no_grad():
            for outer, delta in zip(self.outer_params, deltas):
                outer.grad = delta
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, outer in zip(self.params, self.outer_params):
                p.copy_(outer)
        self._after_update()

    def _result(self, future: concurrent.futures.Future[int | None], what: str) -> int | None:
        try:
            size = future.result(self.round_timeout + 30)
        except Exception as e:  # noqa: BLE001 - the peer updates alone and carries on
            logger.warning("%s averaging of epoch %d failed: %s", what, self.epoch, e)
            size = None
        self.rounds["ok" if size else "no_group"] += 1
        return size

    def _after_update(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    def _advance(self, epoch: int) -> None:
        self.epoch = epoch
        self.samples = 0

    def _resume(self) -> None:
        """Back to training: tell the swarm at once (new epoch, throughput again)."""
        self._training = True
        self._last_step = None
        self.loop.submit(self._publish_progress())

    def _awaited(self, swarm_epoch: int) -> bool:
        """The swarm has just ended our epoch, and the group formed ahead for its round counts on us."""
        return swarm_epoch == self.epoch + 1 and self._prepared_epoch == self.epoch

    def _follow(self, swarm_epoch: int) -> None:
        """The swarm's epoch is ahead of ours: finish ours in the round whose group waits for us
        (the swarm ended it a moment before we noticed), else catch up."""
        if self._awaited(swarm_epoch):
            self._finish_epoch()
        else:
            self._catch_up(swarm_epoch)

    def _catch_up(self, swarm_epoch: int) -> None:
        """The swarm moved on without us: load its state, drop what we accumulated, follow it."""
        logger.info("peer is at epoch %d, the swarm at %d: loading the state from peers", self.epoch, swarm_epoch)
        if self._prepared_epoch == self.epoch:  # its group counts on us: take part, contributing nothing
            nothing = [torch.zeros_like(p) for p in self.params]
            self.loop.submit(self._logged(self._average(nothing, 0.0, round_index=self.epoch), "a promised round"))
        self._training = False
        self._wait_pending()
        if self.mode == "gradients":
            for buffer in self.accumulated:
                buffer.zero_()
        if not self.load_state_from_peers() or self.epoch < swarm_epoch:
            self._advance(swarm_epoch)
        if self.mode == "diloco":
            self._zero_contribution = True
        self._resume()

    # ---- state

    def _synced_tensors(self) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        """The optimizer whose state defines the run, and its parameters."""
        if self.outer is not None:
            return self.outer, self.outer_params
        return self.optimizer, self.params

    def state(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """(metadata, tensors) of this peer's state: parameters, then optimizer statistics."""
        optimizer, params = self._synced_tensors()
        layout, statistics = optimizer_statistics(optimizer)
        return {"epoch": self.epoch, "mode": self.mode, "layout": layout}, [*params, *statistics]

    def load_state(self, metadata: dict[str, Any], tensors: Sequence[torch.Tensor]) -> None:
        """Takes a state given by `state()` (this peer's or another's); raises ValueError if it does not fit."""
        optimizer, params = self._synced_tensors()
        if metadata.get("mode") != self.mode:
            raise ValueError(f"the state is of mode {metadata.get('mode')!r}, this optimizer runs {self.mode!r}")
        if len(tensors) < len(params) or any(t.shape != p.shape for t, p in zip(tensors, params)):
            raise ValueError("the state's parameters do not match this model's shapes")
        self._take(params, tensors)
        load_optimizer_statistics(optimizer, metadata["layout"], tensors[len(params):])
        self.epoch = max(self.epoch, int(metadata["epoch"]))
        self.samples = 0

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
        self.loop.submit(self._logged(self.swarm.publish_state(metadata, copies), "publishing the state"))

    def _average_state(self) -> None:
        """Averages parameters and optimizer statistics with the peers (a state round)."""
        _, tensors = self.state()
        with torch.no_grad():
            buffers = [t.detach().clone() for t in tensors]
        size = self._result(self.loop.submit(self._average(buffers, 1.0, round_index=STATE_ROUNDS + self.epoch)), "state")
        if size:
            self._take(tensors, buffers)

    def _take(self, destinations: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        """Copies `values` into the synced tensors; in local and DiLoCo modes the model's
        parameters then restart from the (new) outer parameters."""
        with torch.no_grad():
            for destination, value in zip(destinations, values):
                destination.copy_(value)
            if self.outer is not None:
                for p, outer in zip(self.params, self.outer_params):
                    p.copy_(outer)

    # ---- background

    async def _publish_progress(self) -> None:
        speed = self.samples_per_second if self._training else 0.0
        await self._logged(self.tracker.publish(self.epoch, self.samples, speed), "publishing progress")

    async def _average(self, tensors: list[torch.Tensor], weight: float, round_index: int) -> int | None:
        """A round with the swarm; none when this peer is alone in the run (nobody to average with)."""
        self._last_outcome = None
        if self.view is not None and self.view.peers <= 1:
            return None
        size = await self.swarm.average(tensors, weight, round_index)
        self._last_outcome = self.swarm.last_outcome
        return size

    async def _refresh(self) -> SwarmProgress:
        await self._publish_progress()
        return await self.tracker.fetch()

    async def _refresh_loop(self) -> None:
        while True:
            try:
                self.view = await self._refresh()
                if self._preparation_due():
                    await self._prepare(self.epoch)
            except Exception as e:  # noqa: BLE001 - the next refresh tries again
                logger.warning("reading the swarm's progress failed: %s", e)
            await asyncio.sleep(self._refresh_interval())

    def _refresh_interval(self) -> float:
        """Shorter as the epoch's end nears, so peers notice it together."""
        eta = self._seconds_until(NEAR_END)
        if eta is None:
            return self.refresh_period
        return min(self.refresh_period, max(FINAL_REFRESH, eta / 2))

    def _seconds_until(self, share: float) -> float | None:
        """Estimated seconds until the swarm's samples reach `share` of the target (None: no estimate)."""
        view = self.view
        if view is None:
            return None
        remaining = share * self.target_batch_size - self.samples - view.others_now()
        speed = max(view.samples_per_second + self.samples_per_second, self.samples_per_second * view.peers)
        if remaining <= 0:
            return 0.0
        return remaining / speed if speed > 0 else None

    def _preparation_due(self) -> bool:
        """This epoch's round has others to meet and is as near as the averager's matchmaking time."""
        if self._prepared_epoch >= self.epoch or not self._training or self.view is None or self.view.peers <= 1:
            return False
        eta = self._seconds_until(1.0)
        return eta is not None and eta <= self.swarm.matchmaking_seconds

    async def _prepare(self, epoch: int) -> None:
        """Has the averager form the group of `epoch`'s round now (it is busy: the next refresh asks again)."""
        if await self.swarm.prepare(self.params, round_index=epoch):
            self._prepared_epoch = epoch

    @staticmethod
    async def _logged(coroutine: Any, what: str) -> Any:
        try:
            return await coroutine
        except Exception as e:  # noqa: BLE001
            logger.warning("%s failed: %s", what, e)
            return None

    # ---- reporting and shutdown

    @property
    def swarm_epoch(self) -> int:
        return max(self.epoch, self.view.epoch if self.view is not None else 0)

    @property
    def peers(self) -> int:
        return self.view.peers if self.view is not None else 1

    def close(self) -> None:
        """Applies a pending update, stops the background work and, if embedded, the services."""
        try:
            self._wait_pending()
        finally:
            try:
                self._refresher.cancel()
                self.loop.run(self.swarm.close(), timeout=30)
            finally:
                self.loop.stop()

    def __enter__(self) -> Optimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

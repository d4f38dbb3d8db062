"""The trainer service: runs a training task with the collaborative optimizer.

It links to the participant's dht and averager services (`dht_local` + `averager_local`) or
starts embedded ones (`initial_peers`, empty for the first peer of a new swarm), trains in a
worker thread while the admin endpoint serves health, status and metrics, checkpoints the
optimizer's state periodically and at the end, and writes a summary when it stops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

import torch
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, Field, model_validator

from apiary import faults
from apiary.averaging.state import State, load_saved_state, save_state
from apiary.files import write_atomically
from apiary.optim import check_mode
from apiary.services.embedded import Optimizer, reaching
from apiary.services.host import ServiceHost, ServiceSettings
from apiary.services.trainer_group import RankWork, TrainerGroup, rank_devices
from apiary.tasks import Task, load_task
from apiary.wire import Endpoint, PeerAddress, WireSettings

logger = logging.getLogger(__name__)


class TrainerSettings(BaseModel):
    run_id: str = Field(..., min_length=1, description="the run's name: peers of one run train together")
    task: str = Field("charlm", description="package.module:factory, or a built-in task name")
    task_options: dict[str, Any] = Field(default_factory=dict, description="keyword settings for the task's factory")
    seed: int = Field(0, description="this peer's data seed")
    target_batch_size: int = Field(256, ge=1, description="samples the swarm accumulates per epoch")
    mode: str = Field("gradients", description="gradients, local, diloco or powersgd")
    average_state_every: int = Field(5, ge=0, description="epochs between state averaging rounds (0: never)")
    delay_updates: bool = Field(False, description="overlap gradient averaging with the next batches")
    delay_state_averaging: bool = Field(False, description="overlap state averaging with the next batches")
    reuse_grad_buffers: bool = Field(False, description="accumulate in the gradients themselves (gradients mode)")
    offload_optimizer: bool = Field(False, description="the optimizer's state and update on the CPU (gradients mode)")
    outer_lr: float = Field(0.7, gt=0, description="DiLoCo's outer learning rate")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="DiLoCo's outer Nesterov momentum")
    powersgd_rank: int = Field(4, ge=1, description="PowerSGD's rank of the gradients' factors")
    powersgd_min_size: int = Field(4096, ge=0, description="PowerSGD: smaller tensors are averaged uncompressed")
    client_mode: bool = Field(False, description="behind NAT: dial out only (embedded services)")
    auxiliary: bool = Field(False, description="do not train: lend bandwidth to the swarm's gradient rounds")
    progress_every: float = Field(10.0, gt=0, description="seconds between progress lines")
    dht_local: Endpoint | None = Field(None, description="the dht service's local API")
    averager_local: Endpoint | None = Field(None, description="the averager service's local API")
    initial_peers: list[PeerAddress] | None = Field(None, description="embedded services joining these ([]: new swarm)")
    averaging: dict[str, Any] = Field(default_factory=dict, description="embedded averager settings (codec, ...)")
    min_peers: int = Field(1, ge=1, description="wait until the run has this many peers before training")
    min_peers_timeout: float = Field(300.0, gt=0, description="seconds to wait for min_peers before failing")
    max_epochs: int = Field(0, ge=0, description="stop at this swarm epoch (0: no limit)")
    max_seconds: float = Field(0, ge=0, description="stop after this many seconds of training (0: no limit)")
    device: str = Field("auto", description="auto (cuda when present), cpu or cuda")
    gpus: int | list[int] = Field(1, description="local trainer ranks, one per GPU: a count, or CUDA device ids")
    threads: int = Field(0, ge=0, description="torch intra-op threads (0: torch's default)")
    checkpoint_dir: Path | None = Field(None, description="where the optimizer's state is kept across restarts")
    checkpoint_period: float = Field(300.0, gt=0, description="seconds between checkpoints")
    summary_path: Path | None = Field(None, description="write a JSON summary here when training stops")
    evaluate_every: float = Field(30.0, gt=0, description="seconds between held-out evaluations")

    @model_validator(mode="after")
    def _check(self) -> TrainerSettings:
        check_mode(self.mode, delay_updates=self.delay_updates, auxiliary=self.auxiliary,
                   reuse_grad_buffers=self.reuse_grad_buffers, offload_optimizer=self.offload_optimizer,
                   delay_state_averaging=self.delay_state_averaging, average_state_every=self.average_state_every)
        services = (self.dht_local is not None, self.averager_local is not None)
        if services[0] != services[1]:
            raise ValueError("give both dht_local and averager_local (the participant's services), or neither")
        if services[0] and self.initial_peers is not None:
            raise ValueError("give either the participant's services (dht_local, averager_local) or initial_peers")
        if not services[0] and self.initial_peers is None:
            self.initial_peers = []
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        self._check_gpus()
        return self

    def _check_gpus(self) -> None:
        if isinstance(self.gpus, int):
            valid = self.gpus >= 1
        else:
            valid = bool(self.gpus) and min(self.gpus) >= 0 and len(set(self.gpus)) == len(self.gpus)
        if not valid:
            raise ValueError(f"gpus must be a count of at least 1 or distinct CUDA device ids, got {self.gpus!r}")
        if self.ranks > 1 and self.auxiliary:
            raise ValueError("an auxiliary peer trains nothing: it runs on one rank (gpus 1)")
        if self.ranks > 1 and self.reuse_grad_buffers:
            raise ValueError("reuse_grad_buffers cannot be combined with several gpus: the local ranks reduce "
                             "each batch's gradients, which the reused buffers would mix with earlier batches'")

    @property
    def ranks(self) -> int:
        """Local trainer ranks (processes) of this participant."""
        return self.gpus if isinstance(self.gpus, int) else len(self.gpus)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but torch sees no CUDA device")
    return torch.device(name)


class TrainerMetrics:
    def __init__(self, registry: Any):
        self.loss = Gauge("apiary_trainer_loss", "Training loss of the latest batch", registry=registry)
        self.samples_per_second = Gauge("apiary_trainer_samples_per_second", "This peer's training throughput",
                                        registry=registry)
        self.local_epoch = Gauge("apiary_trainer_local_epoch", "This peer's epoch", registry=registry)
        self.swarm_epoch = Gauge("apiary_trainer_swarm_epoch", "The swarm's epoch as this peer sees it",
                                 registry=registry)
        self.peers = Gauge("apiary_trainer_peers", "Peers of the run with live progress records", registry=registry)
        self.samples = Counter("apiary_trainer_samples", "Samples this peer trained on", registry=registry)


class TrainerService:
    """Builds and runs the trainer; `start()` loads the task (failing at once on a bad one)."""

    def __init__(self, wire: WireSettings, service: ServiceSettings, settings: TrainerSettings):
        self.settings = settings
        self.devices = ([resolve_device(settings.device)] if settings.gpus == 1
                        else rank_devices(settings.gpus, settings.device))  # one per local rank
        self.device = self.devices[0]
        self.group: TrainerGroup | None = None  # the other local ranks, with several gpus
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.task: Task = load_task(settings.task, seed=settings.seed, **settings.task_options)
        self.task.model.to(self.device)
        self.embedded_wire = wire  # the embedded dht and averager's public ports, TLS, credentials
        self.identity_path = service.identity
        self.reachability = service.reachability  # of the embedded services
        own = wire.model_copy(update={"listen_host": "127.0.0.1", "port": 0, "announce_host": None, "announce_port": None,
                                      "relay": False})
        self.host = ServiceHost("trainer", own, service, status=self.status, ready=lambda: self.optimizer is not None)
        self.metrics = TrainerMetrics(self.host.registry)
        self.optimizer: Optimizer | None = None
        self.summary: dict[str, Any] = {"run_id": settings.run_id, "task": settings.task}
        self.last_loss: float | None = None
        self._stop = threading.Event()

    async def start(self) -> None:
        await self.host.start_service(self.host.start)
        self.host.publish_record(self._dht_local)

    def _dht_local(self) -> Endpoint | None:
        """The local API of the participant's dht service (an embedded one's once the optimizer starts)."""
        services = getattr(self.optimizer.swarm, "services", None) if self.optimizer is not None else None
        return self.settings.dht_local or (services.dht_local if services is not None else None)

    async def run(self) -> None:
        """Trains until done (max_epochs, max_seconds) or stopped, then shuts down."""
        training = asyncio.create_task(asyncio.to_thread(self.train))
        self.host.on_stop(self._stop_training)
        stopped = asyncio.create_task(self.host.run())
        done, _ = await asyncio.wait({training, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if training in done:
            self.host.stop()
            await stopped
            training.result()  # re-raises a training failure
        else:
            await training

    async def _stop_training(self) -> None:
        self._stop.set()

    # ---- the training thread

    def train(self) -> None:
        s = self.settings
        task = self.task
        if len(self.devices) > 1:
            work = RankWork(s.task, s.task_options, s.seed, s.threads)
            self.group = TrainerGroup.start(work, self.devices, timeout=max(1800.0, s.min_peers_timeout + 600))
            self.summary["local_ranks"] = self.group.ranks()
            print("local ranks: " + ", ".join(f"{r['rank']} (pid {r['pid']}, {r['device']})"
                                              for r in self.group.ranks()), flush=True)
        try:
            self._train(s, task)
        finally:
            if self.group is not None:
                self.group.close()

    def _train(self, s: TrainerSettings, task: Task) -> None:
        self.optimizer = optimizer = reaching(self.reachability)(
            s.run_id, task.model.parameters(), task.optimizer, target_batch_size=s.target_batch_size, mode=s.mode,
            dht_local=s.dht_local, averager_local=s.averager_local, initial_peers=s.initial_peers or (),
            client_mode=s.client_mode, auxiliary=s.auxiliary, wire=self.embedded_wire, identity=self.identity_path,
            averaging=s.averaging,
            average_state_every=s.average_state_every, delay_updates=s.delay_updates,
            delay_state_averaging=s.delay_state_averaging,
            reuse_grad_buffers=s.reuse_grad_buffers, offload_optimizer=s.offload_optimizer, outer_lr=s.outer_lr,
            outer_momentum=s.outer_momentum, powersgd_rank=s.powersgd_rank, powersgd_min_size=s.powersgd_min_size,
        )
        if self.group is not None:
            self.group.lead(optimizer.optimizer)
        address = optimizer.swarm.dht_address
        print(f"training; others join with: --initial-peers {address}" if address else "training", flush=True)
        try:
            if s.auxiliary:
                self._assist(optimizer)
                return
            self._restore_checkpoint(optimizer)
            self._wait_for_peers(optimizer)
            self._loop(optimizer, task)
        finally:
            if not s.auxiliary:
                self._save_checkpoint(optimizer)
            self._write_summary(optimizer)
            optimizer.close()

    def _assist(self, optimizer: Optimizer) -> None:
        """An auxiliary peer: joins the swarm's gradient rounds until stopped or done."""
        timer = threading.Timer(self.settings.max_seconds, self._stop.set) if self.settings.max_seconds else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            optimizer.assist(self._stop, self.settings.max_epochs)
        finally:
            if timer is not None:
                timer.cancel()
        self.summary.update(epoch_end=optimizer.epoch, averaged_bytes=optimizer.swarm.averaged_bytes,
                            rounds=dict(optimizer.rounds), history=optimizer.history)

    def _wait_for_peers(self, optimizer: Optimizer) -> None:
        deadline = time.monotonic() + self.settings.min_peers_timeout
        while optimizer.peers < self.settings.min_peers and not self._stop.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the run has {optimizer.peers} peers after {self.settings.min_peers_timeout:.0f}s; "
                                   f"min_peers is {self.settings.min_peers}")
            time.sleep(0.2)

    def _loop(self, optimizer: Optimizer, task: Task) -> None:
        s = self.settings
        started = time.monotonic()
        last_checkpoint = last_evaluation = last_progress = started
        self.summary["loss_start"] = self._evaluate()
        self.summary["epoch_start"] = optimizer.epoch
        samples = 0
        group = self.group
        if group is not None:
            group.share(task.model, optimizer.epoch, advanced=False, force=True)  # the state loaded or restored
        while not self._stop.is_set():
            faults.reached("trainer.epoch", optimizer.epoch)
            if s.max_epochs and optimizer.swarm_epoch >= s.max_epochs:
                break
            if s.max_seconds and time.monotonic() - started >= s.max_seconds:
                break
            if group is not None:
                group.go(True)
            batch = next(task.batches)
            loss = task.loss(task.model, batch)
            loss.backward()
            size = group.reduce_gradients(optimizer.params, task.batch_size) if group is not None else task.batch_size
            advanced = optimizer.step(size)
            if group is not None:
                group.share(task.model, optimizer.epoch, advanced)
            if not s.reuse_grad_buffers:  # else the optimizer clears them after each epoch
                optimizer.zero_grad()
            samples += size
            self.last_loss = float(loss.item())
            self._observe(optimizer, size)
            now = time.monotonic()
            if now - last_progress >= s.progress_every:
                self._print_progress(optimizer, samples, now - started)
                last_progress = now
            if s.checkpoint_dir is not None and now - last_checkpoint >= s.checkpoint_period:
                self._save_checkpoint(optimizer)
                last_checkpoint = now
            if now - last_evaluation >= s.evaluate_every:
                self.summary["loss_latest"] = self._evaluate()
                last_evaluation = now
        if group is not None:
            group.go(False)
            self.summary["rank_digests"] = group.digests
        elapsed = time.monotonic() - started
        self.summary.update(loss_end=self._evaluate(), epoch_end=optimizer.epoch, samples=samples,
                            seconds=round(elapsed, 2), samples_per_second=round(samples / max(elapsed, 1e-9), 1),
                            averaged_bytes=optimizer.swarm.averaged_bytes, rounds=dict(optimizer.rounds),
                            history=optimizer.history)

    def _print_progress(self, optimizer: Optimizer, samples: int, elapsed: float) -> None:
        """One line: epoch, the epoch's progress as a bar, loss, throughput, peers."""
        view = optimizer.view
        done = optimizer.samples + (view.others_now() if view is not None else 0.0)
        share = min(1.0, done / optimizer.target_batch_size)
        bar = "#" * round(20 * share) + "." * (20 - round(20 * share))
        print(f"epoch {optimizer.epoch} (swarm {optimizer.swarm_epoch}) [{bar}] {share:4.0%}  "
              f"loss {self.last_loss:.3f}  {samples / max(elapsed, 1e-9):.0f} samples/s  {optimizer.peers} peers",
              flush=True)

    def _observe(self, optimizer: Optimizer, batch_size: int) -> None:
        m = self.metrics
        if self.last_loss is not None and math.isfinite(self.last_loss):
            m.loss.set(self.last_loss)
        m.samples.inc(batch_size)
        m.samples_per_second.set(optimizer.samples_per_second)
        m.local_epoch.set(optimizer.epoch)
        m.swarm_epoch.set(optimizer.swarm_epoch)
        m.peers.set(optimizer.peers)

    def _evaluate(self) -> float | None:
        if self.task.evaluate is None:
            return None
        self.task.model.eval()
        try:
            return round(self.task.evaluate(self.task.model), 4)
        finally:
            self.task.model.train()

    # ---- checkpoints and summary

    def _checkpoint_path(self) -> Path | None:
        return self.settings.checkpoint_dir / "trainer.pt" if self.settings.checkpoint_dir is not None else None

    def _save_checkpoint(self, optimizer: Optimizer) -> None:
        path = self._checkpoint_path()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            metadata, tensors = optimizer.state()
            save_state(State(metadata, [t.detach().cpu() for t in tensors]), path)
            logger.info("checkpoint of epoch %d saved in %s", optimizer.epoch, path, extra={"event": "checkpoint_saved"})

    def _restore_checkpoint(self, optimizer: Optimizer) -> None:
        path = self._checkpoint_path()
        saved = load_saved_state(path) if path is not None else None
        if saved is not None and saved.epoch > optimizer.epoch:
            optimizer.load_state(saved.metadata, saved.tensors)
            logger.info("resumed from the checkpoint of epoch %d", saved.epoch, extra={"event": "checkpoint_resumed"})

    def _write_summary(self, optimizer: Optimizer) -> None:
        if self.settings.summary_path is not None:
            text = json.dumps(self.summary, indent=2)
            write_atomically(self.settings.summary_path, lambda f: f.write(text.encode()))

    # ---- admin

    def status(self) -> dict[str, Any]:
        optimizer = self.optimizer
        return {
            "run_id": self.settings.run_id,
            "task": self.settings.task,
            "mode": self.settings.mode,
            "device": str(self.device),
            "local_ranks": self.group.ranks() if self.group is not None else None,
            "loss": self.last_loss,
            "local_epoch": optimizer.epoch if optimizer else None,
            "swarm_epoch": optimizer.swarm_epoch if optimizer else None,
            "peers": optimizer.peers if optimizer else None,
            "samples_per_second": round(optimizer.samples_per_second, 1) if optimizer else None,
            "dht_address": optimizer.swarm.dht_address if optimizer else None,
            "summary": self.summary,
        }

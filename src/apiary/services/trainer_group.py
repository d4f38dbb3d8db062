"""Several GPUs per participant (`apiary trainer --gpus G`): the trainer's local ranks.

The trainer service is rank 0: it holds the collaborative optimizer, the swarm's side of the
participant (progress, rounds, state). It spawns ranks 1..G-1, each a process training its
own shard of the data (seed `rank_seed(seed, rank)`) on its own device, following rank 0 in an
`optim.local_group.LocalGroup`: per batch they reduce gradients together, then rank 0 steps and
shares its parameters when they changed. The swarm sees one peer whatever G is.

A rank that fails or is killed stops the trainer with one error naming it (`LocalGroupError`);
the other ranks stop with their leader: they are terminated when it closes the group, and each
exits by itself when its parent process is gone.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from apiary.optim.local_group import LocalGroup, LocalGroupError
from apiary.tasks import Task, load_task

JOIN_TIMEOUT = 120.0  # seconds for the ranks to start and load the task
STOP_TIMEOUT = 10.0  # seconds a rank gets to exit before it is killed


def rank_seed(seed: int, rank: int) -> int:
    """The data seed of local rank `rank` (rank 0 keeps the participant's `seed`)."""
    return seed if rank == 0 else zlib.crc32(f"{seed}/{rank}".encode())


def rank_devices(gpus: int | list[int], device: str) -> list[torch.device]:
    """One device per local rank (a single rank with a count of 1 uses --device as it is):
    `gpus` is a count or CUDA device ids; `device` is the trainer's --device (auto: cuda:<i>
    when CUDA has that many devices, else cpu). Raises ValueError naming what cannot be met."""
    ids = list(range(gpus)) if isinstance(gpus, int) else gpus
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.startswith("cuda:"):
        raise ValueError(f"device {device!r} names one GPU: give the ranks' GPUs as gpus (e.g. 0,1)")
    if isinstance(gpus, int) and (device == "cpu" or (device == "auto" and available < gpus)):
        return [torch.device("cpu")] * gpus
    if device == "cpu":
        raise ValueError(f"gpus {gpus} names CUDA devices, but the device is cpu: give a count of ranks")
    if any(i >= available for i in ids):
        raise ValueError(f"gpus asks for CUDA devices {ids}, but torch sees {available}")
    return [torch.device(f"cuda:{i}") for i in ids]


@dataclass(frozen=True)
class RankWork:
    """What a local rank needs to train: the task and its settings."""

    task: str
    task_options: dict[str, Any]
    seed: int
    threads: int


class TrainerGroup:
    """Rank 0's side of the participant's local group: starts the other ranks, reduces with
    them, shares rank 0's state, and stops them."""

    def __init__(self, group: LocalGroup, store: dist.Store, processes: list[Any], devices: list[torch.device]):
        self.group, self.store, self.processes, self.devices = group, store, processes, devices
        self.digests: dict[int, list[str]] = {}  # epoch -> every rank's digest of the parameters
        self._stepped = False
        self._finished = False  # the ranks were told to stop

    @classmethod
    def start(cls, work: RankWork, devices: list[torch.device], timeout: float) -> TrainerGroup:
        """Spawns ranks 1.. on `devices[1:]` and forms the group with them (rank 0 on
        `devices[0]`); `timeout`: the longest a collective may wait (rank 0's rounds included)."""
        size = len(devices)
        store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=JOIN_TIMEOUT))
        context = mp.get_context("spawn")
        processes = []
        try:
            for rank in range(1, size):
                process = context.Process(
                    target=follow, args=(rank, size, store.port, work, str(devices[rank]), os.getpid(), timeout),
                    name=f"apiary-trainer-rank-{rank}", daemon=True)
                process.start()
                processes.append(process)
            _wait_for_ranks(store, processes)
            group = LocalGroup(0, size, devices[0], store, timeout)
        except BaseException:
            _stop(processes, grace=0.0)
            raise
        return cls(group, store, processes, devices)

    def lead(self, optimizer: torch.optim.Optimizer) -> None:
        """Notes every step of rank 0's wrapped `optimizer`: the parameters then change."""
        optimizer.register_step_post_hook(lambda *_: setattr(self, "_stepped", True))

    def go(self, going: bool) -> bool:
        """Tells the other ranks to train one more batch, or (False) to stop."""
        with self._collective():
            self.group.go(going)
        self._finished = not going
        return going

    def reduce_gradients(self, params: Sequence[torch.nn.Parameter], batch_size: int) -> int:
        """Mean gradients of all the ranks' batches in `params`; the ranks' total samples."""
        with self._collective():
            return self.group.reduce_gradients(params, batch_size)

    def share(self, model: torch.nn.Module, epoch: int, advanced: bool, force: bool = False) -> None:
        """Sends the model's parameters and buffers to the other ranks when they changed (a step
        of the optimizer, an epoch's end, or `force`); at an epoch's end checks the ranks agree."""
        changed, self._stepped = force or advanced or self._stepped, False
        with self._collective():
            if self.group.share(model_tensors(model), changed=changed, check=advanced):
                digests = self.group.digests(list(model.parameters()))
                self.digests[epoch] = digests
                if any(d != digests[0] for d in digests):
                    raise LocalGroupError(f"the local ranks' parameters differ at epoch {epoch}")

    def ranks(self) -> list[dict[str, Any]]:
        """Each rank's process id and device."""
        pids = [os.getpid(), *(p.pid for p in self.processes)]
        return [{"rank": r, "pid": pid, "device": str(d)} for r, (pid, d) in enumerate(zip(pids, self.devices))]

    def close(self) -> None:
        """Waits for the ranks to exit (after `go(False)`), terminating and killing any that do
        not; at once when the group broke or stops early."""
        _stop(self.processes, STOP_TIMEOUT if self._finished else 0.0)
        self.group.close()

    @contextmanager
    def _collective(self) -> Iterator[None]:
        """A failed collective becomes a LocalGroupError naming the rank that stopped."""
        try:
            yield
        except LocalGroupError:
            raise
        except Exception as e:  # gloo/nccl report a lost rank as RuntimeError (DistBackendError)
            raise _failure(self.store, self.processes, e) from None


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """What the ranks keep identical: the model's parameters and buffers."""
    return [*model.parameters(), *model.buffers()]


def follow(rank: int, size: int, port: int, work: RankWork, device_name: str, parent: int, timeout: float) -> None:
    """A local rank's process: trains its batches, following rank 0, until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 stops us
    _exit_with(parent)
    store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=timedelta(seconds=JOIN_TIMEOUT))
    try:
        if work.threads:
            torch.set_num_threads(work.threads)
        task = load_task(work.task, seed=rank_seed(work.seed, rank), **work.task_options)
        device = torch.device(device_name)
        task.model.to(device)
        store.set(f"joined/{rank}", "1")
        group = LocalGroup(rank, size, device, store, timeout)
        _follow(group, task)
        group.close()
    except BaseException as e:  # noqa: BLE001 (told to rank 0 through the store, when it is still there)
        try:
            store.set(f"error/{rank}", " ".join(f"{type(e).__name__}: {e}".split())[:300])
        except Exception:  # noqa: BLE001 (rank 0 is gone: it has nothing to hear)
            pass
        os._exit(1)


def _follow(group: LocalGroup, task: Task) -> None:
    model = task.model
    params = [p for p in model.parameters() if p.requires_grad]
    tensors = model_tensors(model)
    group.share(tensors)  # rank 0's initial state
    while group.go():
        loss = task.loss(model, next(task.batches))
        loss.backward()
        group.reduce_gradients(params, task.batch_size)
        for p in params:
            p.grad = None
        if group.share(tensors):
            group.digests(list(model.parameters()))


def _exit_with(parent: int) -> None:
    """Ends this process when `parent` is gone (killed: it could not stop us)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, name="apiary-rank-parent", daemon=True).start()


def _wait_for_ranks(store: dist.Store, processes: list[Any]) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT
    for rank, process in enumerate(processes, start=1):
        while not store.check([f"joined/{rank}"]):
            if process.exitcode is not None or time.monotonic() > deadline:
                raise _failure(store, processes, None)
            time.sleep(0.1)


def _failure(store: dist.Store, processes: list[Any], error: Exception | None) -> LocalGroupError:
    """The error naming the rank that stopped (waits briefly for its exit to show)."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and all(p.exitcode is None for p in processes):
        time.sleep(0.1)
    for rank, process in enumerate(processes, start=1):
        if process.exitcode is not None:
            how = (f"killed by {signal.Signals(-process.exitcode).name}" if process.exitcode < 0
                   else f"exit code {process.exitcode}")
            reason = _stored(store, f"error/{rank}")
            return LocalGroupError(f"local rank {rank} of {len(processes) + 1} stopped ({how})"
                                   + (f": {reason}" if reason else ""))
    if error is None:
        return LocalGroupError(f"the local ranks did not join within {JOIN_TIMEOUT:.0f}s")
    return LocalGroupError(f"the local group failed: {' '.join(str(error).split())[:300]}")


def _stored(store: dist.Store, key: str) -> str | None:
    try:
        return store.get(key).decode() if store.check([key]) else None
    except Exception:  # noqa: BLE001 (the store is unusable: nothing stored)
        return None


def _stop(processes: list[Any], grace: float) -> None:
    """Waits up to `grace` seconds for the ranks to exit, then terminates and kills those that do not."""
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for stop in (lambda p: p.terminate(), lambda p: p.kill()):
        for process in processes:
            if process.is_alive():
                stop(process)
        for process in processes:
            process.join(2.0)

"""Dynamic batching: many small requests to one expert become one batch.

Requests for the same (expert, method) wait in a bounded queue. One asyncio task serves all
queues: it takes the queue whose oldest request has waited longest, waits until that queue
holds `max_batch_size` samples or its oldest request has waited `max_wait_seconds`, joins up
to `max_batch_size` samples of requests of one group (e.g. the same keyword inputs) along
dim 0, runs the expert in a worker thread (the event loop keeps serving meanwhile) and splits
the results back to each request. An optional observer
sees every executed batch (method, samples, each request's wait, compute time), for metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

BatchFunction = Callable[[list[torch.Tensor]], list[torch.Tensor]]
Key = tuple[str, str]  # (expert name, method)
BatchObserver = Callable[[str, int, list[float], float], None]  # method, samples, waits, compute seconds


class QueueFull(RuntimeError):
    """Too many requests wait for this expert and method already: try later or elsewhere."""


class BatchTooLarge(ValueError):
    """One request holds more samples than a batch may."""


@dataclass
class _Request:
    tensors: list[torch.Tensor]
    samples: int
    future: asyncio.Future[list[torch.Tensor]]
    function: BatchFunction
    alone: bool = False  # runs as a batch of its own, with its own function
    group: tuple[str, ...] = ()  # only requests of one group share a batch (e.g. the same keyword inputs)
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class _Queue:
    requests: deque[_Request] = field(default_factory=deque)
    samples: int = 0


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    samples: int = 0


class BatchingRuntime:
    """Batches requests per (expert, method); `start()` inside a running loop, `shutdown()` after."""

    def __init__(self, max_batch_size: int = 256, max_wait_seconds: float = 0.01, max_queued_requests: int = 1024,
                 observer: BatchObserver | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_wait_seconds < 0:
            raise ValueError(f"max_wait_seconds must be non-negative, got {max_wait_seconds}")
        if max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be at least 1, got {max_queued_requests}")
        self.max_batch_size = max_batch_size
        self.max_wait_seconds = max_wait_seconds
        self.max_queued_requests = max_queued_requests
        self.observer = observer
        self.stats: dict[Key, BatchStats] = {}
        self._queues: dict[Key, _Queue] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve(), name="apiary-moe-batching")

    async def shutdown(self) -> None:
        """Cancels the batching task and fails every request still queued."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for queue in self._queues.values():
            while queue.requests:
                request = queue.requests.popleft()
                if not request.future.done():
                    request.future.set_exception(RuntimeError("the expert runtime is shutting down"))
            queue.samples = 0

    # ---- requests

    async def submit(self, key: Key, function: BatchFunction, tensors: Sequence[torch.Tensor], *,
                     alone: bool = False, group: tuple[str, ...] = ()) -> list[torch.Tensor]:
        """Runs `function` on `tensors` (each [samples, ...]) batched with other requests of `key`
        and `group` (or, if `alone`, as a batch of its own: in its turn, without waiting for others);
        returns this request's share of the results. Raises QueueFull or BatchTooLarge."""
        if self._task is None:
            raise RuntimeError("the expert runtime is not running")
        samples = tensors[0].shape[0]
        if any(t.shape[0] != samples for t in tensors):
            raise ValueError("every tensor of a request must have the same number of samples (dim 0)")
        if samples > self.max_batch_size:
            raise BatchTooLarge(f"a request holds {samples} samples; the limit is max_batch_size={self.max_batch_size}")
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue()
        if len(queue.requests) >= self.max_queued_requests:
            raise QueueFull(f"{len(queue.requests)} {key[1]} requests already wait for expert {key[0]!r}; "
                            f"the limit is {self.max_queued_requests}")
        request = _Request(list(tensors), samples, asyncio.get_running_loop().create_future(), function, alone, group)
        queue.requests.append(request)
        queue.samples += samples
        self._wakeup.set()
        return await request.future  # a caller that gives up cancels its future: the batch skips it

    # ---- the batching task

    def _oldest(self) -> Key | None:
        oldest: tuple[float, Key] | None = None
        for key, queue in self._queues.items():
            while queue.requests and queue.requests[0].future.done():  # cancelled by its caller
                queue.samples -= queue.requests.popleft().samples
            if queue.requests and (oldest is None or queue.requests[0].enqueued < oldest[0]):
                oldest = (queue.requests[0].enqueued, key)
        return oldest[1] if oldest else None

    async def _serve(self) -> None:
        while True:
            key = self._oldest()
            if key is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            queue = self._queues[key]
            wait = queue.requests[0].enqueued + self.max_wait_seconds - time.monotonic()
            if queue.samples < self.max_batch_size and wait > 0 and not queue.requests[0].alone:
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(wait):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
                continue
            batch: list[_Request] = []
            samples = 0
            while queue.requests and samples + queue.requests[0].samples <= self.max_batch_size:
                if batch and (queue.requests[0].alone or queue.requests[0].group != batch[0].group):
                    break
                request = queue.requests.popleft()
                queue.samples -= request.samples
                if not request.future.done():
                    batch.append(request)
                    samples += request.samples
                    if request.alone:
                        break
            if batch:
                await self._run(key, batch[0].function, batch)

    async def _run(self, key: Key, function: BatchFunction, batch: list[_Request]) -> None:
        started = time.monotonic()
        samples = sum(request.samples for request in batch)
        try:
            joined = [torch.cat(parts) if len(parts) > 1 else parts[0]
                      for parts in zip(*(request.tensors for request in batch))]
            try:
                results = await asyncio.to_thread(function, joined)
            finally:
                if self.observer is not None:
                    self.observer(key[1], samples, [started - request.enqueued for request in batch],
                                  time.monotonic() - started)
            sizes = [request.samples for request in batch]
            shares = list(zip(*(result.split(sizes) for result in results)))
        except asyncio.CancelledError:
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(RuntimeError("the expert runtime is shutting down"))
            raise
        except Exception as e:
            logger.exception("%s of expert %r failed on a batch of %d requests", key[1], key[0], len(batch))
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(e)
            return
        stats = self.stats.setdefault(key, BatchStats())
        stats.batches += 1
        stats.requests += len(batch)
        stats.samples += samples
        for request, share in zip(batch, shares):
            if not request.future.done():
                request.future.set_result(list(share))

"""An asyncio event loop on a thread of its own, for synchronous code (training loops) that
drives asynchronous clients (DHT, averager) in the background."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """Runs an event loop in a daemon thread until `stop()`.

        loop = LoopThread("apiary-optimizer")
        result = loop.run(some_coroutine(), timeout=10)   # blocks the caller, not the loop
        future = loop.submit(other_coroutine())          # concurrent.futures.Future
        loop.stop()
    """

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedules `coroutine` on the loop; the caller may wait on the returned future."""
        if self.in_loop():
            coroutine.close()
            raise RuntimeError("LoopThread.submit() was called from the loop's own thread")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Runs `coroutine` on the loop and waits for it; on timeout cancels it and raises TimeoutError."""
        future = self.submit(coroutine)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"the background call took more than {timeout:.1f} s") from None

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def stop(self, timeout: float = 10.0) -> None:
        """Cancels the tasks still on the loop, stops it and joins the thread."""
        if self.loop.is_closed():
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(cancel_all(), timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self.loop.close()

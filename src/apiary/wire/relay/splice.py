"""Splicing two TCP connections: bytes copied both ways, paced, counted, and cut when idle.

Used by the relay (dialer <-> reserved peer, paced by its byte rate limits), by a reserved
peer (circuit <-> its own gRPC or bulk port) and by a dialer's forwarder (gRPC channel <->
circuit). Each direction reads into one reused buffer and writes it out before reading again,
so a slow reader slows its writer through TCP's own flow control, circuit by circuit.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Sequence

_BUFFER_BYTES = 256 * 1024
_MIN_BURST = 64 * 1024


class TokenBucket:
    """A byte rate (bytes per second, 0: unlimited) with bursts of one second's worth (at least 64 KiB).
    Takers over the rate wait their turn: the debt they leave makes later takers wait longer."""

    def __init__(self, rate: float):
        self.rate = rate
        self._burst = max(rate, _MIN_BURST)
        self._tokens = self._burst
        self._updated = time.monotonic()

    async def take(self, nbytes: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._updated) * self.rate) - nbytes
        self._updated = now
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)


class Idle(Exception):
    """Neither direction of a splice carried a byte for its idle timeout."""


async def splice(a: socket.socket, b: socket.socket, *, idle_timeout: float | None = None,
                 buckets: Sequence[TokenBucket] = (), on_bytes: Callable[[int], None] | None = None) -> None:
    """Copies bytes both ways between the non-blocking sockets `a` and `b` until both ends have
    closed (a half-close is passed on), one fails, or neither sends for `idle_timeout` seconds
    (Idle); then closes both. Every byte waits for each of `buckets` and is told to `on_bytes`."""
    last = [time.monotonic()]
    pumps = [asyncio.ensure_future(_pump(a, b, idle_timeout, last, buckets, on_bytes)),
             asyncio.ensure_future(_pump(b, a, idle_timeout, last, buckets, on_bytes))]
    try:
        done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
        for pump in done:
            pump.result()  # the failure of one direction ends both
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        a.close()
        b.close()


async def _pump(source: socket.socket, sink: socket.socket, idle_timeout: float | None, last: list[float],
                buckets: Sequence[TokenBucket], on_bytes: Callable[[int], None] | None) -> None:
    loop = asyncio.get_running_loop()
    buffer = bytearray(_BUFFER_BYTES)
    view = memoryview(buffer)
    while True:
        try:
            async with asyncio.timeout(idle_timeout):
                received = await loop.sock_recv_into(source, buffer)
        except TimeoutError:
            if time.monotonic() - last[0] < idle_timeout:  # type: ignore[operator]  # the other way is busy
                continue
            raise Idle(f"no byte either way for {idle_timeout:g} s") from None
        if received == 0:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
            return
        for bucket in buckets:
            await bucket.take(received)
        await loop.sock_sendall(sink, view[:received])
        last[0] = time.monotonic()
        if on_bytes is not None:
            on_bytes(received)

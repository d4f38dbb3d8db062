"""Measuring helpers shared by the benchmarks (standard library only, so that the hivemind
reference benchmark can use them from its own virtual environment)."""

from __future__ import annotations

import asyncio
import socket
import time


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values` by nearest rank; NaN if there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def rate(outcomes: list[bool]) -> float:
    """The fraction of True outcomes; NaN if there are none."""
    return sum(outcomes) / len(outcomes) if outcomes else float("nan")


async def recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, buffer: memoryview) -> None:
    filled = 0
    while filled < len(buffer):
        received = await loop.sock_recv_into(sock, buffer[filled:])
        if not received:
            raise ConnectionError("peer closed")
        filled += received


async def raw_exchange(me: int, raw_ports: list[int], listener: socket.socket, nbytes: int,
                       sinks: dict[int, memoryview]) -> float:
    """Sends `nbytes` to every other peer and receives as much from each, all at once, over plain
    TCP on loopback; connections are made before the clock starts."""
    loop = asyncio.get_running_loop()
    others = [i for i in range(len(raw_ports)) if i != me]
    payload = memoryview(bytearray(nbytes))
    for i in others:
        if i not in sinks:
            sinks[i] = memoryview(bytearray(nbytes))

    async def accept_all() -> list[socket.socket]:
        accepted = []
        for _ in others:
            sock, _ = await loop.sock_accept(listener)
            accepted.append(sock)
        return accepted

    async def connect(i: int) -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", raw_ports[i]))
        sock.sendall(me.to_bytes(4, "little"))  # who I am, so the acceptor files my bytes under me
        return sock

    accepted, outgoing = await asyncio.gather(accept_all(), asyncio.gather(*(connect(i) for i in others)))
    incoming = {}
    for sock in accepted:
        header = memoryview(bytearray(4))
        await recv_exactly(loop, sock, header)
        incoming[int.from_bytes(header, "little")] = sock
    for sock in [*accepted, *outgoing]:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    started = time.perf_counter()
    await asyncio.gather(*(loop.sock_sendall(sock, payload) for sock in outgoing),
                         *(recv_exactly(loop, sock, sinks[i]) for i, sock in incoming.items()))
    elapsed = time.perf_counter() - started
    for sock in [*accepted, *outgoing]:
        sock.close()
    return elapsed

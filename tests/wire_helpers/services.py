"""A small service of the tests' own, served by a real RpcServer: handlers that sleep, fail or
refuse on purpose (test fixtures, not mocks of apiary code)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

from apiary.wire import CallContext, InvalidRequest, Method, PayloadTooLarge, ServiceSpec
from apiary.wire.bulk import BulkAnswer, BulkCall
from apiary.wire.protos.wire_pb2 import PingReply, PingRequest

TROUBLE = ServiceSpec(
    "apiary.test.Trouble",
    (
        Method("Sleep", PingRequest, PingReply),
        Method("Crash", PingRequest, PingReply),
        Method("Reject", PingRequest, PingReply),
        Method("TooLarge", PingRequest, PingReply),
        Method("CountThenCrash", PingRequest, PingReply, server_streaming=True),
    ),
)


class Trouble:
    """Implements TROUBLE; records what happened to the sleeping handler."""

    def __init__(self, sleep_seconds: float = 30.0):
        self.sleep_seconds = sleep_seconds
        self.sleep_started = asyncio.Event()
        self.sleep_cancelled = asyncio.Event()

    async def sleep(self, request: PingRequest, context: CallContext) -> PingReply:
        self.sleep_started.set()
        try:
            await asyncio.sleep(self.sleep_seconds)
        except asyncio.CancelledError:
            self.sleep_cancelled.set()
            raise
        return PingReply(peer_id="slept")

    async def crash(self, request: PingRequest, context: CallContext) -> PingReply:
        raise RuntimeError("the disk is on fire")

    async def reject(self, request: PingRequest, context: CallContext) -> PingReply:
        raise InvalidRequest("field 'count' must be positive, got -3")

    async def too_large(self, request: PingRequest, context: CallContext) -> PingReply:
        raise PayloadTooLarge("field 'items' holds 9000 entries, above the limit max_items=100")

    async def count_then_crash(self, request: PingRequest, context: CallContext) -> AsyncIterator[PingReply]:
        for i in range(3):
            yield PingReply(peer_id=str(i))
        raise KeyError("expert ffn.9")


async def slow_route(call: BulkCall) -> BulkAnswer:
    await asyncio.sleep(30)
    return BulkAnswer()


async def crash_route(call: BulkCall) -> BulkAnswer:
    raise ZeroDivisionError("averaging weight is zero")


async def reject_route(call: BulkCall) -> BulkAnswer:
    raise InvalidRequest("field 'group' is empty")


async def echo_route(call: BulkCall) -> BulkAnswer:
    return BulkAnswer(body=call.body[::-1], tensors=[(header, memoryview(payload)) for header, payload in call.tensors])


def unused_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Waits until `condition()` holds. A server records a failed call (metrics, span) just after
    the caller has its error, so checks of those records wait for them."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition still false after {timeout}s")
        await asyncio.sleep(0.01)

"""A gRPC channel's way through a relay: a local socket whose connections become circuits.

gRPC dials addresses, not sockets, so `ChannelPool` points a relayed endpoint's channel at a
`Forwarder`: a Unix socket in a private folder (only this user's processes can use it, and
through it this peer's credentials) that opens a circuit (`open_circuit`) for each connection
gRPC makes and splices the two. TLS runs inside, from the channel to the target, bound to
the target's peer id as on a direct channel. When a circuit cannot be opened the connection is
closed and the reason kept (`failure`), so the call's error can name it rather than gRPC's
"connection closed". With a `Puncher`, a connection takes a direct socket to the target when
one was punched, and a connection through the relay starts a punch for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING

from apiary.wire.address import Endpoint
from apiary.wire.auth import CallCredentials
from apiary.wire.errors import WireError
from apiary.wire.protos.relay_pb2 import GRPC
from apiary.wire.relay.dial import open_circuit
from apiary.wire.relay.splice import splice

if TYPE_CHECKING:
    from apiary.wire.relay.punch import Puncher

FAILURE_KEPT_SECONDS = 30.0  # how long a failure to open a circuit explains failed calls
_numbers = itertools.count()


class Forwarder:
    """Listens on a Unix socket in `folder`; each connection is spliced to a circuit to `endpoint`."""

    def __init__(self, endpoint: Endpoint, folder: Path, *, credentials: CallCredentials | None, timeout: float,
                 idle_timeout: float | None = None, kind: int = GRPC, puncher: Puncher | None = None):
        self.endpoint = endpoint
        self.puncher = puncher
        self.credentials = credentials
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.kind = kind
        self.path = folder / f"relay-{next(_numbers)}.sock"
        self._failure: tuple[float, WireError] | None = None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.path))
            listener.listen(64)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._tasks: set[asyncio.Task[None]] = set()
        self._spawn(self._accept_loop())

    @property
    def target(self) -> str:
        """The gRPC target that reaches the forwarder."""
        return f"unix:{self.path}"

    def failure(self) -> WireError | None:
        """Why the latest circuit could not be opened (None if it could, or that was long ago)."""
        if self._failure is None or time.monotonic() - self._failure[0] > FAILURE_KEPT_SECONDS:
            return None
        return self._failure[1]

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            local, _ = await loop.sock_accept(self._listener)
            local.setblocking(False)
            self._spawn(self._forward(local))

    async def _forward(self, local: socket.socket) -> None:
        try:
            if self.puncher is not None:
                circuit, _ = await self.puncher.dial(self.endpoint, self.kind, timeout=self.timeout)
            else:
                circuit = await open_circuit(self.endpoint, kind=self.kind, credentials=self.credentials,
                                             timeout=self.timeout)
        except WireError as e:
            self._failure = (time.monotonic(), e)
            local.close()
            return
        except BaseException:
            local.close()
            raise
        self._failure = None
        with contextlib.suppress(Exception):  # the circuit ended, however it ended
            await splice(local, circuit, idle_timeout=self.idle_timeout)

    async def close(self) -> None:
        """Stops listening and ends every circuit."""
        self._listener.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

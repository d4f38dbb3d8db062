"""Expert servers that failed, skipped by the trainer's beam search and calls for a while.

A server whose call fails for want of a connection (killed, unreachable) or of an answer
(frozen) would otherwise cost every following pass its timeout, until its declarations expire
from the DHT. `ServerBans` keeps them out instead: a failed server is banned for 5 s, and for
twice as long after each further failure (at most 5 minutes); an answer lifts the ban and
forgets its failures. A server that only missed a pass's cut-off (it may be far, or busy) is
not banned on that alone: it is asked for `Info` (no computation) within the pass's timeout,
once at a time, and banned only if that fails too. The layers of a process share one list,
`server_bans()`; it is used on `apiary.moe.client.background_loop()` only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from apiary.dht.blacklist import Blacklist
from apiary.wire import DeadlineExceeded, PeerUnavailable, WireError

logger = logging.getLogger(__name__)

FAILURES = (PeerUnavailable, DeadlineExceeded)  # no connection, or no answer: the server, not the request


class ServerBans:
    """Banned expert servers by address, with backed-off durations (see the module's docstring)."""

    def __init__(self, base_seconds: float = 5.0, max_seconds: float = 300.0):
        self._blacklist = Blacklist(base_seconds, max_seconds)
        self._probes: dict[str, asyncio.Task[None]] = {}

    def banned(self, address: str) -> bool:
        return self._blacklist.banned(address)

    def outcome(self, address: str, error: BaseException | None) -> None:
        """Records how a call to the server ended: an answer (even a refusal) lifts its ban; a
        missing connection or answer bans it."""
        if error is None or not isinstance(error, FAILURES):
            self._blacklist.succeeded(address)
        else:
            if not self.banned(address):
                logger.info("expert server %s is skipped for a while: %s", address, error, extra={"event": "peer_banned"})
            self._blacklist.failed(address)

    def probe(self, address: str, ask: Callable[[], Awaitable[object]]) -> None:
        """For a server that missed a pass's cut-off: `ask()` (a cheap call with its own deadline)
        runs in the background, one at a time per server, and its outcome is recorded."""
        if address in self._probes or self.banned(address):
            return

        async def run() -> None:
            try:
                await ask()
            except WireError as e:
                self.outcome(address, e)
            else:
                self.outcome(address, None)
            finally:
                del self._probes[address]

        self._probes[address] = asyncio.ensure_future(run())

    def __len__(self) -> int:
        """Servers banned now."""
        return len(self._blacklist)


_process_bans: ServerBans | None = None


def server_bans() -> ServerBans:
    """The process's ban list, shared by every mixture layer that is given none."""
    global _process_bans
    if _process_bans is None:
        _process_bans = ServerBans()
    return _process_bans

"""A peer dialing a relay, for the relay-limit test (tests/test_net_relay_limits.py):

    python -m net.relay_dialer --relay RELAY_ID@198.18.0.1:7300 --target TARGET_ID@198.18.0.1:7300/via/RELAY_ID \\
        --identity FILE [--run-authority ID --access-token FILE]

It prints one JSON line per step, in this order:
- `reserve`: a reservation of its own at the relay (given back at once);
- `held`: a ping of the target through its relayed address, on a channel kept open (one circuit);
- `second`: a ping on another channel while that circuit is open;
- `after`: a ping on a new channel once the held one is closed.
Each line is {"step", "peer_id"} when answered, or {"step", "error": "<class>: <message>"}.
No hole punching: every ping goes through the relay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

from apiary.wire import PROBE, ChannelPool, Identity, OverLimit, PeerAddress, RpcClient, WireSettings
from apiary.wire.auth import CallCredentials
from apiary.wire.protos.wire_pb2 import PingRequest
from apiary.wire.relay.reservations import reserve

TIMEOUT = 10.0


async def _step(name: str, action: Callable[[], Awaitable[str]]) -> None:
    try:
        record = {"step": name, "peer_id": await action()}
    except Exception as e:  # the refusal is the result
        record = {"step": name, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(record), flush=True)


async def _ping(pool: ChannelPool, target: PeerAddress) -> str:
    reply = await RpcClient(pool, PROBE, target.endpoint, timeout=TIMEOUT, peer_id=target.peer_id).call(
        "Ping", PingRequest())
    return reply.peer_id


async def dial(relay: PeerAddress, target: PeerAddress, identity: Identity, settings: WireSettings) -> None:
    credentials = CallCredentials.for_run(settings.run_authority, settings.access_token, identity)

    async def reserved() -> str:
        connection, _ = await reserve(relay, identity, credentials, TIMEOUT)
        connection.close()
        return identity.peer_id

    await _step("reserve", reserved)
    async with ChannelPool(settings, identity=identity) as held:
        await _step("held", lambda: _ping(held, target))
        async with ChannelPool(settings, identity=identity) as second:
            await _step("second", lambda: _ping(second, target))
    await _step("after", lambda: _ping_again(settings, identity, target))


async def _ping_again(settings: WireSettings, identity: Identity, target: PeerAddress) -> str:
    """A ping on a new channel, tried for up to TIMEOUT seconds: the relay learns that a circuit
    closed when its bytes stop, moments after the dialer closed it."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while True:
        try:
            async with ChannelPool(settings, identity=identity) as pool:
                return await _ping(pool, target)
        except OverLimit:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relay", required=True, help="the relay: peer_id@host:port")
    parser.add_argument("--target", required=True, help="the target's relayed address")
    parser.add_argument("--identity", required=True, type=Path)
    parser.add_argument("--run-authority", default=None)
    parser.add_argument("--access-token", default=None)
    args = parser.parse_args(argv)
    settings = WireSettings(run_authority=args.run_authority, access_token=args.access_token, relay_punch=False,
                            default_timeout=TIMEOUT)
    asyncio.run(dial(PeerAddress.parse(args.relay), PeerAddress.parse(args.target), Identity.load(args.identity),
                     settings))


if __name__ == "__main__":
    main()

"""Opening a circuit: a dialer's TCP connection through a relay to a reserved peer.

`open_circuit` connects to the relay of a relayed endpoint, asks for a circuit to the
endpoint's target (`Connect`, with a private run's credentials), and returns the socket once
the relay has spliced it: from then on it carries the target's bytes, and the caller speaks
TLS to the target over it exactly as over a direct connection.
"""

from __future__ import annotations

import asyncio
import socket

import grpc

from apiary.wire.address import Endpoint
from apiary.wire.auth import CallCredentials
from apiary.wire.errors import DeadlineExceeded, PeerUnavailable
from apiary.wire.protos.relay_pb2 import GRPC, Connect
from apiary.wire.relay.protocol import KINDS, client_frame, expect, open_control, request_digest_of, send


async def open_circuit(endpoint: Endpoint, *, kind: int = GRPC, credentials: CallCredentials | None = None,
                       timeout: float) -> socket.socket:
    """A non-blocking socket spliced to `endpoint.target_peer` through `endpoint`'s relay, within
    `timeout` seconds. Raises the relay's refusal as the WireError its code maps to (its message
    names the limit), PeerUnavailable if the relay is unreachable, DeadlineExceeded past `timeout`."""
    if not endpoint.relayed:
        raise ValueError(f"{endpoint} is not a relayed endpoint")
    relay = endpoint.direct
    what = f"relay circuit ({KINDS.get(kind, kind)}) to {endpoint.target_peer}"
    try:
        async with asyncio.timeout(timeout):
            connection, greeting = await open_control(relay, endpoint.relay_peer, timeout)
            try:
                request = Connect(target_peer=endpoint.target_peer, kind=kind)  # type: ignore[arg-type]
                if credentials is not None:
                    request.metadata.update(credentials.metadata("relay:connect", audience=endpoint.relay_peer,
                                                                 digest=request_digest_of(greeting.nonce, request)))
                await send(connection, client_frame(request))
                await expect(connection, "connected", relay, what)
            except BaseException:
                connection.close()
                raise
    except TimeoutError:
        raise DeadlineExceeded(f"{what} through {relay} did not open within {timeout:.1f}s", peer=str(endpoint),
                               code=grpc.StatusCode.DEADLINE_EXCEEDED) from None
    except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
        raise PeerUnavailable(f"{what}: relay {relay} unreachable: {e}", peer=str(endpoint),
                              code=grpc.StatusCode.UNAVAILABLE) from None
    return connection.sock

"""A simulated network for the real services' code: hosts that serve `ServiceSpec`s, calls that
take a link's latency and its bytes' transmission time in virtual time (`loop`), crashed hosts
that answer nothing, and every call's bytes counted by host and method.

`Network.transport(origin)` is what `DHTNode(transport=...)` takes in place of `RpcClient`: the
request is serialized, carried, parsed and handed to the target's servicer as a gRPC server would
(a handler's `RequestError` reaches the caller as the `WireError` a real client raises), and the
answer comes back the same way. A call's bytes are its message plus `CALL_OVERHEAD` (HTTP/2 and
gRPC framing, about what a small unary call costs on a warm channel), counted for the host that
sent them, the one that received them and, both ways, for the one that answered (`served`).

Links: each host draws an access latency (log-normal, median 10 ms one-way), a place on a ring
whose half is 100 ms one-way (distance between continents) and an uplink (log-normal, median
20 Mbit/s); a message takes both access latencies, the ring distance and its size over the
slower uplink. Everything is drawn from the network's seed.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from apiary.wire import ChannelPool, DeadlineExceeded, Endpoint, ServiceSpec, WireSettings
from apiary.wire.errors import RequestError, error_from_status

CALL_OVERHEAD = 60  # bytes of framing per message


@dataclass
class Host:
    endpoint: Endpoint
    access: float  # seconds, one way
    place: float  # position on the ring, 0..1
    uplink: float  # bytes per second
    services: dict[str, Any] = field(default_factory=dict)
    up: bool = True


class SimServer:
    """What a service attaches to in place of an `RpcServer`: a host's services, at its endpoint."""

    def __init__(self, host: Host, settings: WireSettings):
        self.host = host
        self.settings = settings
        self.announced = host.endpoint

    def add_service(self, spec: ServiceSpec, implementation: Any) -> None:
        self.host.services[spec.name] = implementation


class _Context:
    """The `CallContext` a handler sees: the caller's transport address."""

    def __init__(self, origin: Endpoint):
        self.peer = f"ipv4:{origin.host}:{origin.port}"
        self.metadata: dict[str, str] = {}

    def time_remaining(self) -> float | None:
        return None


class Network:
    def __init__(self, seed: int, *, median_access: float = 0.010, ring: float = 0.200,
                 median_uplink: float = 20e6 / 8):
        self.rng = random.Random(seed)
        self.median_access, self.ring, self.median_uplink = median_access, ring, median_uplink
        self.hosts: dict[Endpoint, Host] = {}
        self.sent: Counter[tuple[Endpoint, str]] = Counter()  # (host, method): bytes it sent
        self.received: Counter[tuple[Endpoint, str]] = Counter()
        self.served: Counter[tuple[Endpoint, str]] = Counter()  # (host, method): bytes of calls it answered, both ways
        self.calls: Counter[tuple[Endpoint, str]] = Counter()  # (caller, method): calls made
        self.payload: Counter[tuple[Endpoint, str]] = Counter()  # (host, method): the messages' bytes of the calls it
        # answered, both ways, without framing (what a real server's apiary_*_rpc_*_bytes_total count)
        self.traced: Endpoint | None = None  # a caller whose Finds' start times are noted in `starts`
        self.starts: list[float] = []
        self.settings = WireSettings(listen_host="127.0.0.1", bulk=False)

    def host(self) -> Host:
        """A new host on the network (10.x.y.z, port 4000)."""
        index = len(self.hosts) + 1
        endpoint = Endpoint(f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}", 4000)
        host = Host(endpoint, self.median_access * math.exp(0.5 * self.rng.gauss(0, 1)), self.rng.random(),
                    self.median_uplink * math.exp(0.7 * self.rng.gauss(0, 1)))
        self.hosts[endpoint] = host
        return host

    def server(self, host: Host) -> SimServer:
        return SimServer(host, self.settings)

    def pool(self) -> ChannelPool:
        """The pool a simulated service is given (it never dials: the transport carries its calls)."""
        return ChannelPool(self.settings)

    def delay(self, source: Host, target: Host, size: int) -> float:
        """Seconds for `size` bytes from `source` to arrive at `target`."""
        apart = abs(source.place - target.place)
        return source.access + target.access + self.ring * min(apart, 1 - apart) + size / min(source.uplink, target.uplink)

    def transport(self, origin: Host) -> Any:
        """The client factory (RpcClient's arguments) of a service on `origin`."""
        network = self

        class Client:
            def __init__(self, pool: ChannelPool, spec: ServiceSpec, endpoint: Endpoint, *, timeout: float | None = None,
                         peer_id: str | None = None):
                self.spec, self.endpoint = spec, endpoint
                self.timeout = timeout or pool.settings.default_timeout

            async def call(self, method_name: str, request: Any, *, timeout: float | None = None) -> Any:
                timeout = timeout or self.timeout
                try:
                    return await asyncio.wait_for(network.carry(origin, self.endpoint, self.spec, method_name, request),
                                                  timeout)
                except asyncio.TimeoutError:
                    raise DeadlineExceeded(f"{method_name} to {self.endpoint} took over {timeout}s",
                                           peer=str(self.endpoint)) from None

        return Client

    async def carry(self, origin: Host, endpoint: Endpoint, spec: ServiceSpec, method_name: str, request: Any) -> Any:
        """One call: the request there, the handler, the answer back (a crashed or absent host
        never answers: the caller's deadline ends the call)."""
        method = spec.method(method_name)
        data = request.SerializeToString()
        target = self.hosts.get(endpoint)
        self.calls[origin.endpoint, method_name] += 1
        if origin.endpoint == self.traced and method_name == "Find":
            self.starts.append(asyncio.get_running_loop().time())
        self._count(origin, endpoint, method_name, len(data), endpoint)
        if target is None or not target.up:
            await asyncio.Future()  # lost
        await asyncio.sleep(self.delay(origin, target, len(data) + CALL_OVERHEAD))
        if not (target.up and origin.up):
            await asyncio.Future()
        handler = getattr(target.services[spec.name], method.handler_name)
        try:
            answer = (await handler(method.request.FromString(data), _Context(origin.endpoint))).SerializeToString()
        except RequestError as e:
            self._count(target, origin.endpoint, method_name, len(str(e)), endpoint)
            await asyncio.sleep(self.delay(target, origin, len(str(e)) + CALL_OVERHEAD))
            raise error_from_status(e.code, str(e), peer=str(endpoint), method=method_name) from None
        self._count(target, origin.endpoint, method_name, len(answer), endpoint)
        await asyncio.sleep(self.delay(target, origin, len(answer) + CALL_OVERHEAD))
        return method.response.FromString(answer)

    def _count(self, source: Host, target: Endpoint, method: str, size: int, server: Endpoint) -> None:
        self.sent[source.endpoint, method] += size + CALL_OVERHEAD
        self.received[target, method] += size + CALL_OVERHEAD
        self.served[server, method] += size + CALL_OVERHEAD
        self.payload[server, method] += size

    def traffic(self) -> dict[Endpoint, int]:
        """Bytes each host sent and received, all methods."""
        total: Counter[Endpoint] = Counter()
        for (endpoint, _), size in (self.sent + self.received).items():
            total[endpoint] += size
        return dict(total)

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()
        self.served.clear()
        self.payload.clear()
        self.calls.clear()

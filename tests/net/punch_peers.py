"""The three roles of the hole-punching test (tests/test_net_punch.py), one process each on a host:

    python -m net.punch_peers relay --host 198.18.0.1
    python -m net.punch_peers target --host 10.2.0.2 --relay <peer@host:port>
    python -m net.punch_peers dialer --endpoint <relayed endpoint>

Each prints one JSON line when ready (the relay its address, the target its relayed endpoint),
then answers each line on stdin with one JSON line: the relay `stats` (bytes carried through
circuits, circuits open); the dialer `calls` (a Ping, a 1 MiB gRPC Sink and a 1 MiB bulk sink
to the target, and its punch counts) and `settle` (waits until no punch is under way, then
its punch counts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator

from apiary.wire import PROBE, ChannelPool, Endpoint, Identity, PeerAddress, RpcClient, RpcServer, WireSettings
from apiary.wire.bulk import BulkClient
from apiary.wire.probe import SINK_ROUTE
from apiary.wire.protos.wire_pb2 import PingRequest, SinkReply, SinkRequest, TensorChunk, TensorHeader
from apiary.wire.relay import Reservations

MIB = 1 << 20


def report(record: dict[str, object]) -> None:
    print(json.dumps(record), flush=True)


async def commands() -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        yield line.strip()


async def relay(host: str) -> None:
    server = RpcServer(WireSettings(listen_host=host, relay=True), Identity.generate())
    await server.start()
    assert server.relay is not None
    report({"relay": str(server.relay_address)})
    async for _ in commands():
        report({"bytes": server.relay.bytes_relayed, "circuits": server.relay.circuits})


async def target(host: str, relay_address: str) -> None:
    server = RpcServer(WireSettings(listen_host=host), Identity.generate())
    await server.start()
    pool = ChannelPool.like(server)
    relays = [PeerAddress.parse(relay_address)]

    async def listed() -> list[PeerAddress]:
        return relays

    held = Reservations(server, pool, listed, count=1)
    await held.start()
    while not held.endpoints:
        await asyncio.sleep(0.05)
    report({"endpoint": str(held.endpoints[0])})
    await asyncio.Event().wait()  # serves until killed


async def calls(pool: ChannelPool, client: BulkClient, endpoint: Endpoint) -> dict[str, object]:
    ping = await RpcClient(pool, PROBE, endpoint, timeout=20).call("Ping", PingRequest())
    header = TensorHeader(dtype="uint8", shape=[MIB], nbytes=MIB)

    async def chunks() -> AsyncIterator[TensorChunk]:
        yield TensorChunk(header=header, data=bytes(MIB))

    sunk = (await RpcClient(pool, PROBE, endpoint, timeout=20).call("Sink", chunks())).total_bytes
    body, _ = await client.call(endpoint, SINK_ROUTE, body=SinkRequest().SerializeToString(),
                                tensors=[(header, memoryview(bytearray(MIB)))], timeout=20)
    return {"peer": ping.peer_id, "grpc": sunk, "bulk": SinkReply.FromString(body).total_bytes}


async def dialer(endpoint_text: str) -> None:
    endpoint = Endpoint.parse(endpoint_text)
    async with ChannelPool(WireSettings()) as pool:
        client = BulkClient(pool.settings, puncher=pool.puncher)
        report({"ready": True})
        async for command in commands():
            if command == "settle":
                for _ in range(300):  # a punch takes at most the offers' round trips and 3 s of connecting
                    if pool.puncher.attempted == pool.puncher.succeeded + pool.puncher.failed:
                        break
                    await asyncio.sleep(0.05)
            done = await calls(pool, client, endpoint) if command == "calls" else {}
            puncher = pool.puncher
            report({**done, "attempted": puncher.attempted, "succeeded": puncher.succeeded, "failed": puncher.failed})
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)
    roles.add_parser("relay").add_argument("--host", required=True)
    role = roles.add_parser("target")
    role.add_argument("--host", required=True)
    role.add_argument("--relay", required=True)
    roles.add_parser("dialer").add_argument("--endpoint", required=True)
    args = parser.parse_args()
    if args.role == "relay":
        asyncio.run(relay(args.host))
    elif args.role == "target":
        asyncio.run(target(args.host, args.relay))
    else:
        asyncio.run(dialer(args.endpoint))


if __name__ == "__main__":
    main()

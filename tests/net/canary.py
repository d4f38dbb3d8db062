"""Sends a tensor of known bytes to a peer (its Probe service's gRPC `Sink`), for tests that look
for those bytes on the wire:

    python -m net.canary --to <peer-id>@<address> --text 5ecret --bytes 32768

The tensor is `--text` repeated to `--bytes` bytes; TLS as every peer dials (bound to the peer
id), through a relay when the address is relayed. Prints one JSON line: the bytes the peer got.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator

from apiary.wire import PROBE, ChannelPool, PeerAddress, RpcClient, WireSettings
from apiary.wire.protos.wire_pb2 import TensorChunk, TensorHeader


async def send(to: PeerAddress, data: bytes) -> int:
    header = TensorHeader(dtype="uint8", shape=[len(data)], nbytes=len(data))

    async def chunks() -> AsyncIterator[TensorChunk]:
        yield TensorChunk(header=header, data=data)

    async with ChannelPool(WireSettings(relay_punch=False)) as pool:  # through the relay, if relayed
        reply = await RpcClient(pool, PROBE, to.endpoint, peer_id=to.peer_id, timeout=20).call("Sink", chunks())
    return int(reply.total_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--to", type=PeerAddress.parse, required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--bytes", type=int, default=32768)
    args = parser.parse_args()
    data = (args.text.encode() * (args.bytes // len(args.text) + 1))[: args.bytes]
    print(json.dumps({"sunk": asyncio.run(send(args.to, data))}), flush=True)


if __name__ == "__main__":
    main()

"""A state donor in its own process, for the state-transfer tests.

`python -m tests.state_donor_worker --seed S --epoch E [--initial-peer ADDR] [--corrupt]
[--codec NAME]` runs a DHT node and a donor of seeded tensors (compressed by the download codec
NAME), announces it, prints the DHT address as JSON, and serves until terminated. With --corrupt it flips a byte of every tensor it sends after the
checksum is computed (a fault injected for the test).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import torch

from apiary.averaging.state import STATE_ROUTE, State, StateDonor
from apiary.dht import DHTNode
from apiary.wire import Identity, PeerAddress, RpcServer, WireSettings
from apiary.wire.bulk import BulkAnswer, BulkCall


def seeded_tensors(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(300, 70, generator=generator), torch.randn(5, generator=generator).to(torch.bfloat16),
            torch.randint(0, 9, (11,), generator=generator)]


class CorruptingDonor(StateDonor):
    async def handle(self, call: BulkCall) -> BulkAnswer:
        answer = await super().handle(call)
        corrupted = []
        for header, payload in answer.tensors:
            flipped = bytearray(payload)
            flipped[0] ^= 0xFF
            corrupted.append((header, memoryview(flipped)))
        return BulkAnswer(answer.body, corrupted)


async def main(args: argparse.Namespace) -> None:
    initial = [PeerAddress.parse(args.initial_peer)] if args.initial_peer else []
    dht = await DHTNode.launch(initial)
    identity = Identity.generate()
    server = RpcServer(WireSettings(listen_host="127.0.0.1"), identity)
    donor = (CorruptingDonor if args.corrupt else StateDonor)("run", identity.peer_id, codec=args.codec)
    server.bulk.add_route(STATE_ROUTE, donor.handle)
    await server.start()
    donor.bulk_address = str(server.announced_bulk)
    donor.update(State({"epoch": args.epoch, "note": "hello"}, seeded_tensors(args.seed)))
    assert await donor.announce(dht, ttl=300)
    print(json.dumps({"dht": dht.address, "peer_id": identity.peer_id}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)
    await dht.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--epoch", type=int, required=True)
    parser.add_argument("--initial-peer", default="")
    parser.add_argument("--corrupt", action="store_true")
    parser.add_argument("--codec", default="none")
    asyncio.run(main(parser.parse_args()))

"""A peer that floods a server with Sink streams, for the limits test.

    python -m tests.trust_flood_worker --target HOST:PORT --seconds S --concurrency N --tensor-bytes B

Runs N loops, each sending one tensor of B bytes per Sink call, back to back, for S seconds.
Prints `{"event": "started"}` once the first call ended, then at the end
`{"event": "done", "ok": N, "rejected": N, "cut": N, "other": N, "rejected_details": "..."}`
(`cut`: streams the server ended while they were still sending, which gRPC reports as INTERNAL).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

import torch

from worker_support import die_with_parent, emit

from apiary.wire import PROBE, ChannelPool, Endpoint, RpcClient, WireError, WireSettings
from apiary.wire.tensors import tensors_to_chunks


async def flood(target: Endpoint, seconds: float, concurrency: int, tensor_bytes: int) -> None:
    tensor = torch.zeros(tensor_bytes, dtype=torch.uint8)
    counts: Counter[str] = Counter()
    details: dict[str, str] = {}
    started = asyncio.Event()
    end = time.monotonic() + seconds

    async def chunks():  # type: ignore[no-untyped-def]
        for chunk in tensors_to_chunks([tensor], 1 << 20):
            yield chunk

    async with ChannelPool(WireSettings(default_timeout=10)) as pool:
        client = RpcClient(pool, PROBE, target)

        async def loop() -> None:
            while time.monotonic() < end:
                try:
                    await client.call("Sink", chunks(), timeout=10)
                    counts["ok"] += 1
                except WireError as e:
                    code = e.code.name if e.code is not None else ""
                    # a stream the server refuses while the caller still sends may end as INTERNAL on the caller's side
                    kind = ("rejected" if code == "RESOURCE_EXHAUSTED"
                            else "cut" if code == "INTERNAL" and "Internal error from Core" in str(e) else "other")
                    counts[kind] += 1
                    details.setdefault(kind, str(e))
                if not started.is_set():
                    started.set()
                    emit({"event": "started"})

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    emit({"event": "done", "ok": counts["ok"], "rejected": counts["rejected"], "cut": counts["cut"], "other": counts["other"],
          "rejected_details": details.get("rejected", ""), "other_details": details.get("other", "")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tensor-bytes", type=int, default=1 << 20)
    args = parser.parse_args()
    die_with_parent()
    torch.set_num_threads(1)
    asyncio.run(flood(Endpoint.parse(args.target), args.seconds, args.concurrency, args.tensor_bytes))


if __name__ == "__main__":
    main()

"""An expert server in a process of its own, for tests/test_moe_expert.py.

    python -m tests.moe_expert_worker --config '{"experts": [["ffn.0.0", "ffn", 16, 0]], ...}'

Each expert is [name, kind, hidden_size, seed] (and optionally its dtype): built right after `torch.manual_seed(seed)`,
so a test can build the identical module with `build_local`. Prints `{"port": PORT}` once
serving; stops when stdin closes or on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

import torch
from worker_support import die_with_parent, emit

from apiary.moe import BatchingRuntime, Expert, ExpertServer, ExpertSpec, ExpertTraining, build_expert
from apiary.wire import Identity, RpcServer, WireSettings


def build_local(name: str, kind: str, hidden: int, seed: int) -> torch.nn.Module:
    """The module the worker hosts under `name`, as it was before any training step."""
    torch.manual_seed(seed)
    return build_expert(ExpertSpec(name, kind, hidden))


async def main(config: dict[str, Any]) -> None:
    experts = [Expert(ExpertSpec(name, kind, hidden, *dtype), build_local(name, kind, hidden, seed),
                      training=ExpertTraining(lr=config.get("lr", 1e-2)))
               for name, kind, hidden, seed, *dtype in config["experts"]]
    runtime = BatchingRuntime(config.get("max_batch_size", 16), config.get("max_wait_seconds", 0.05),
                              config.get("max_queued_requests", 64))
    server = ExpertServer(experts, runtime)
    rpc = RpcServer(WireSettings(listen_host="127.0.0.1", bulk=False), Identity.generate())
    server.attach(rpc)
    await server.start()
    await rpc.start()
    emit({"port": rpc.port})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.buffer.read1(4096) else None)
    try:
        await stop.wait()
    finally:
        await rpc.stop(0.5)
        await server.close()


if __name__ == "__main__":
    die_with_parent()
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    asyncio.run(main(json.loads(parser.parse_args().config)))

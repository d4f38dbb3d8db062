"""An expert server in a process of its own, for tests/test_moe_expert.py.

    python -m tests.moe_expert_worker --config '{"experts": [["ffn.0.0", "ffn", 16, 0]], ...}'

Each expert is [name, kind, hidden_size, seed] (and optionally its dtype): built right after `torch.manual_seed(seed)`,
so a test can build the identical module with `build_local`. Prints `{"port": PORT}` once
serving; stops when stdin closes or on SIGTERM. `serving(config)` runs one for a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import torch
from worker_support import die_with_parent, emit

from apiary.moe import BatchingRuntime, Expert, ExpertServer, ExpertSpec, ExpertTraining, build_expert
from apiary.wire import Identity, RpcServer, WireSettings


def build_local(name: str, kind: str, hidden: int, seed: int) -> torch.nn.Module:
    """The module the worker hosts under `name`, as it was before any training step."""
    torch.manual_seed(seed)
    return build_expert(ExpertSpec(name, kind, hidden))


@contextmanager
def serving(config: dict[str, Any]) -> Iterator[str]:
    """A worker process serving `config`'s experts, as `host:port`; killed on exit."""
    root = Path(__file__).resolve().parent.parent
    own = f"{root / 'src'}{os.pathsep}{root / 'tests'}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": f"{os.environ['PYTHONPATH']}{os.pathsep}{own}" if os.environ.get("PYTHONPATH") else own}
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finalizer below
    process = subprocess.Popen([sys.executable, "-m", "tests.moe_expert_worker", "--config", json.dumps(config)],
                               cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                               start_new_session=True)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        line = process.stdout.readline() if ready else b""
        if not line:
            stderr.seek(0)
            pytest.fail(f"the expert worker did not start:\n{stderr.read().decode(errors='replace')[-3000:]}")
        yield f"127.0.0.1:{json.loads(line)['port']}"
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(10)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()
        stderr.close()


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

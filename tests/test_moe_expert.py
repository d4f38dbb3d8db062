"""The expert server end to end: a worker process hosts experts, RemoteExpert calls them."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from moe_expert_worker import build_local

from apiary.moe import BatchingRuntime, Expert, ExpertSpec, QueueFull, RemoteExpert
from apiary.wire import RequestRejected

REPO_ROOT = Path(__file__).resolve().parent.parent
HIDDEN = 16
EXPERTS = [
    ["ffn.0.0", "ffn", HIDDEN, 0],  # compared with a local copy: never trained by another test
    ["ffn.0.1", "ffn", HIDDEN, 1],  # trained by the backward test
    ["ffn.0.2", "ffn", HIDDEN, 2],  # batching and refusals
    ["block.0.0", "transformer", HIDDEN, 3],
]
MAX_BATCH = 16


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    config = {"experts": EXPERTS, "max_batch_size": MAX_BATCH, "max_wait_seconds": 0.2, "lr": 0.05}
    own = f"{REPO_ROOT / 'src'}{os.pathsep}{REPO_ROOT / 'tests'}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": f"{os.environ['PYTHONPATH']}{os.pathsep}{own}" if os.environ.get("PYTHONPATH") else own}
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finalizer below
    process = subprocess.Popen([sys.executable, "-m", "tests.moe_expert_worker", "--config", json.dumps(config)],
                               cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
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


def test_forward_and_input_gradient_match_the_local_module(endpoint: str) -> None:
    local = build_local(*EXPERTS[0])
    remote = RemoteExpert(endpoint, "ffn.0.0", timeout=10)
    x = torch.randn(5, HIDDEN)
    x_remote = x.clone().requires_grad_(True)
    x_local = x.clone().requires_grad_(True)
    y_remote, y_local = remote(x_remote), local(x_local)
    torch.testing.assert_close(y_remote, y_local, atol=1e-5, rtol=1e-5)
    weights = torch.randn(5, HIDDEN)
    (y_remote * weights).sum().backward()
    (y_local * weights).sum().backward()
    assert x_remote.grad is not None and x_local.grad is not None
    torch.testing.assert_close(x_remote.grad, x_local.grad, atol=1e-5, rtol=1e-5)


def test_transformer_expert_matches_the_local_module(endpoint: str) -> None:
    local = build_local(*EXPERTS[3])
    remote = RemoteExpert(endpoint, "block.0.0", timeout=10)
    x = torch.randn(2, 7, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(remote(x), local(x), atol=1e-5, rtol=1e-5)
    info = remote.info()
    assert (info.name, info.kind, info.hidden_size) == ("block.0.0", "transformer", HIDDEN)


def test_backward_trains_the_remote_expert(endpoint: str) -> None:
    remote = RemoteExpert(endpoint, "ffn.0.1", timeout=10)
    x = torch.randn(4, HIDDEN)
    with torch.no_grad():
        before = remote(x)
    remote(x.clone().requires_grad_(True)).pow(2).sum().backward()
    with torch.no_grad():
        after = remote(x)
    assert not torch.allclose(before, after)
    assert remote.info().updates == 1


def test_concurrent_requests_are_batched(endpoint: str) -> None:
    remote = RemoteExpert(endpoint, "ffn.0.2", timeout=10)
    local = build_local(*EXPERTS[2])  # ffn.0.2 is never trained
    before = remote.info()
    inputs = [torch.randn(2, HIDDEN) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool, torch.no_grad():
        outputs = list(pool.map(remote, inputs))
    with torch.no_grad():
        for x, y in zip(inputs, outputs):  # each caller got its own share of the batch
            torch.testing.assert_close(y, local(x), atol=1e-5, rtol=1e-5)
    after = remote.info()
    requests = after.forward_requests - before.forward_requests
    batches = after.forward_batches - before.forward_batches
    assert requests == 8
    assert batches < requests, f"{requests} requests took {batches} batches"


@pytest.mark.parametrize(
    ("name", "x", "message"),
    [
        ("ffn.0.2", torch.randn(3, HIDDEN + 1), "input shape is [3, 17], expected float32[batch, 16]"),
        ("ffn.0.2", torch.randn(3, 2, HIDDEN), "input shape is [3, 2, 16]"),
        ("ffn.0.2", torch.randn(3, HIDDEN, dtype=torch.float64), "input dtype is float64, expected float32"),
        ("ffn.9.9", torch.randn(3, HIDDEN), "expert 'ffn.9.9' is not hosted here"),
        ("ffn.0.2", torch.randn(MAX_BATCH + 1, HIDDEN), f"17 samples; the limit is max_batch_size={MAX_BATCH}"),
    ],
    ids=["hidden", "rank", "dtype", "unknown", "oversized"],
)
def test_bad_requests_are_rejected_and_the_server_keeps_serving(endpoint: str, name: str, x: torch.Tensor,
                                                                message: str) -> None:
    remote = RemoteExpert(endpoint, name, timeout=10)
    with pytest.raises(RequestRejected) as raised, torch.no_grad():
        remote(x)
    assert message in str(raised.value)
    if name != "ffn.9.9":
        assert f"'{name}'" in str(raised.value)
    with torch.no_grad():
        assert RemoteExpert(endpoint, "ffn.0.2", timeout=10)(torch.randn(2, HIDDEN)).shape == (2, HIDDEN)


def test_backward_with_a_mismatched_gradient_is_rejected(endpoint: str) -> None:
    remote = RemoteExpert(endpoint, "ffn.0.2", timeout=10)
    with pytest.raises(RequestRejected, match="output gradient shape is \\[2, 16\\], expected \\[3, 16\\]"):
        remote.call("Backward", [torch.randn(3, HIDDEN), torch.randn(2, HIDDEN)])
    assert remote.info().updates == 0


# ---- in-process units


def test_expert_validation_names_the_expert() -> None:
    expert = Expert(ExpertSpec("ffn.1.2", "ffn", 8))
    with pytest.raises(ValueError, match=r"expert 'ffn.1.2': input shape is \[4, 9\], expected float32\[batch, 8\]"):
        expert.forward([torch.randn(4, 9)])
    with pytest.raises(ValueError, match="unknown kind 'moe'"):
        ExpertSpec("x", "moe", 8)


def test_expert_backward_clips_and_steps() -> None:
    expert = Expert(ExpertSpec("ffn.0.0", "ffn", 8), lr=0.1, max_grad_norm=0.5)
    before = [p.detach().clone() for p in expert.module.parameters()]
    x = torch.randn(3, 8)
    (grad,) = expert.backward([x], [torch.ones(3, 8)])
    assert grad.shape == x.shape and expert.updates == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, expert.module.parameters()))


async def test_runtime_batches_and_bounds_its_queue() -> None:
    runtime = BatchingRuntime(max_batch_size=8, max_wait_seconds=0.05, max_queued_requests=4)
    runtime.start()
    try:
        def double(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            return [tensors[0] * 2]

        xs = [torch.full((2, 1), float(i)) for i in range(4)]
        results = await asyncio.gather(*(runtime.submit(("e", "forward"), double, [x]) for x in xs))
        assert all(torch.equal(r[0], x * 2) for r, x in zip(results, xs))
        assert runtime.stats[("e", "forward")].batches == 1
        tasks = [asyncio.ensure_future(runtime.submit(("e", "forward"), double, [xs[0]])) for _ in range(5)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="the limit is 4"):
            await tasks[-1]
        await asyncio.gather(*tasks[:-1])
    finally:
        await runtime.shutdown()
    assert runtime._task is None


def test_an_unreachable_server_fails_within_the_deadline() -> None:
    import socket
    import time

    from apiary.wire import WireError

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    remote = RemoteExpert(f"127.0.0.1:{port}", "ffn.0.0", timeout=2)
    started = time.monotonic()
    with pytest.raises(WireError), torch.no_grad():
        remote(torch.randn(2, HIDDEN))
    assert time.monotonic() - started < 5

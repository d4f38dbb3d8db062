"""The expert server end to end: a worker process hosts experts, RemoteExpert calls them."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from moe_expert_worker import build_local, serving

from apiary.moe import BatchingRuntime, Expert, ExpertSpec, ExpertTraining, QueueFull, RemoteExpert
from apiary.wire import NotFound, OverLimit, RequestRejected, WireError

HIDDEN = 16
EXPERTS = [
    ["ffn.0.0", "ffn", HIDDEN, 0],  # compared with a local copy: never trained by another test
    ["ffn.0.1", "ffn", HIDDEN, 1],  # trained by the backward test
    ["ffn.0.2", "ffn", HIDDEN, 2],  # batching and refusals
    ["block.0.0", "transformer", HIDDEN, 3],
    ["half.0.0", "ffn", HIDDEN, 4, "bfloat16"],
]
MAX_BATCH = 16


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with serving({"experts": EXPERTS, "max_batch_size": MAX_BATCH, "max_wait_seconds": 0.2, "lr": 0.05}) as address:
        yield address


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


def test_a_bfloat16_expert_matches_the_local_module_with_half_the_bytes(endpoint: str) -> None:
    local = build_local("half.0.0", "ffn", HIDDEN, 4)
    x = torch.randn(8, HIDDEN, requires_grad=True)
    grad = torch.randn(8, HIDDEN)
    local_x = x.detach().clone().requires_grad_(True)
    local(local_x).backward(grad)
    half = RemoteExpert(endpoint, "half.0.0", timeout=10, dtype=None)  # the wire's dtype from the schema
    output = half(x)
    output.backward(grad)
    assert half.wire_dtype() == torch.bfloat16 and output.dtype == x.grad.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(output, local(x), atol=3e-2, rtol=3e-2)  # bfloat16: 8 bits of mantissa
    torch.testing.assert_close(x.grad, local_x.grad, atol=3e-2, rtol=3e-2)
    full = RemoteExpert(endpoint, "half.0.0", timeout=10)  # float32 on the wire: accepted too
    full(x).backward(grad)
    assert half.bytes_sent / full.bytes_sent < 0.55 and half.bytes_received / full.bytes_received < 0.55


def test_a_float16_expert_on_the_cpu_computes_in_float32_and_answers_float16() -> None:
    torch.manual_seed(0)
    expert = Expert(ExpertSpec("ffn.0.0", "ffn", 8, "float16"), training=ExpertTraining(lr=0.0))
    x = torch.randn(4, 8)
    (output,) = expert.forward([x.half()])
    assert output.dtype == torch.float16
    torch.testing.assert_close(output.float(), expert.module(x).detach(), atol=1e-2, rtol=1e-2)
    (grad_input,) = expert.backward([x.half()], [torch.ones(4, 8, dtype=torch.float16)])
    assert grad_input.dtype == torch.float16 and bool(torch.isfinite(grad_input).all())
    with pytest.raises(ValueError, match="input dtype is bfloat16, expected float16 or float32"):
        expert.forward([x.bfloat16()])


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
    ("name", "x", "error", "message"),
    [
        ("ffn.0.2", torch.randn(3, HIDDEN + 1), RequestRejected, "input shape is [3, 17], expected float32[batch, 16]"),
        ("ffn.0.2", torch.randn(3, 2, HIDDEN), RequestRejected, "input shape is [3, 2, 16]"),
        ("ffn.0.2", torch.randn(3, HIDDEN, dtype=torch.float64), RequestRejected,
         "input dtype is float64, expected float32"),
        ("ffn.9.9", torch.randn(3, HIDDEN), NotFound, "expert 'ffn.9.9' is not hosted here"),
        ("ffn.0.2", torch.randn(MAX_BATCH + 1, HIDDEN), OverLimit,
         f"17 samples; the limit is max_batch_size={MAX_BATCH}"),
    ],
    ids=["hidden", "rank", "dtype", "unknown", "oversized"],
)
def test_bad_requests_are_rejected_and_the_server_keeps_serving(endpoint: str, name: str, x: torch.Tensor,
                                                                error: type[WireError], message: str) -> None:
    remote = RemoteExpert(endpoint, name, timeout=10)
    with pytest.raises(error) as raised:
        remote.call("Forward", [x])  # as sent: a RemoteExpert module would cast x to the wire's dtype
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
    expert = Expert(ExpertSpec("ffn.0.0", "ffn", 8), training=ExpertTraining(lr=0.1, max_grad_norm=0.5))
    before = [p.detach().clone() for p in expert.module.parameters()]
    x = torch.randn(3, 8)
    (grad,) = expert.backward([x], [torch.ones(3, 8)])
    assert grad.shape == x.shape and expert.updates == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, expert.module.parameters()))


def test_schedules_warm_up_then_decay_to_zero_at_total_steps() -> None:
    linear = ExpertTraining(lr=1.0, scheduler="linear", warmup_steps=2, total_steps=6)
    assert [linear.learning_rate(u) for u in range(7)] == pytest.approx([0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    cosine = ExpertTraining(lr=1.0, scheduler="cosine", warmup_steps=0, total_steps=4)
    assert [cosine.learning_rate(u) for u in range(5)] == pytest.approx([0.8535534, 0.5, 0.1464466, 0.0, 0.0])
    assert [ExpertTraining(lr=1.0, warmup_steps=4).learning_rate(u) for u in (0, 3, 9)] == [0.25, 1.0, 1.0]
    with pytest.raises(ValueError, match="cosine scheduler decays until total_steps, which must exceed warmup_steps=5"):
        ExpertTraining(scheduler="cosine", warmup_steps=5, total_steps=5)
    with pytest.raises(ValueError, match="momentum is for sgd; the optimizer is adam"):
        ExpertTraining(momentum=0.9)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_an_expert_steps_as_its_torch_optimizer_under_its_schedule(optimizer: str) -> None:
    training = ExpertTraining(optimizer, lr=0.05, momentum=0.9 if optimizer == "sgd" else 0.0, weight_decay=0.01,
                              scheduler="linear", warmup_steps=1, total_steps=3)
    torch.manual_seed(0)
    expert = Expert(ExpertSpec("ffn.0.0", "ffn", 8), training=training)
    reference = copy.deepcopy(expert.module)
    torch_optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer]
    kwargs = {"momentum": 0.9} if optimizer == "sgd" else {}
    reference_optimizer = torch_optimizer(reference.parameters(), lr=0.05, weight_decay=0.01, **kwargs)
    generator = torch.Generator().manual_seed(1)
    for lr in [0.05, 0.025, 0.0, 0.0]:  # warm-up step, then linear decay reaching 0 at step 3
        x, grad = torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator)
        expert.backward([x], [grad])
        reference_optimizer.zero_grad()
        reference(x).backward(grad)
        reference_optimizer.param_groups[0]["lr"] = lr
        reference_optimizer.step()
    assert expert.updates == 4
    for ours, theirs in zip(expert.module.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs)


def test_an_expert_without_optimizer_answers_gradients_and_never_changes() -> None:
    torch.manual_seed(0)
    expert = Expert(ExpertSpec("ffn.0.0", "ffn", 8), training=ExpertTraining("none"))
    before = copy.deepcopy(expert.module)
    x, grad = torch.randn(4, 8), torch.randn(4, 8)
    (grad_input,) = expert.backward([x], [grad])
    local_x = x.clone().requires_grad_(True)
    before(local_x).backward(grad)
    torch.testing.assert_close(grad_input, local_x.grad)
    assert expert.updates == 0
    assert all(torch.equal(a, b) for a, b in zip(before.parameters(), expert.module.parameters()))


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

    from apiary.wire import WireError

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    remote = RemoteExpert(f"127.0.0.1:{port}", "ffn.0.0", timeout=2)
    started = time.monotonic()
    with pytest.raises(WireError), torch.no_grad():
        remote(torch.randn(2, HIDDEN))
    assert time.monotonic() - started < 5


def test_kept_activations_give_the_recomputed_gradients_and_are_bounded() -> None:
    from apiary.moe.activations import ActivationCache

    torch.manual_seed(0)
    kept_expert = Expert(ExpertSpec("ffn.0.0", "ffn", 8), training=ExpertTraining(lr=0.1))
    torch.manual_seed(0)
    recomputing = Expert(ExpertSpec("ffn.0.0", "ffn", 8), training=ExpertTraining(lr=0.1))
    x, grad = torch.randn(4, 8), torch.randn(4, 8)
    (output,), kept = kept_expert.forward_keeping([x])
    torch.testing.assert_close(output, recomputing.forward([x])[0])
    torch.testing.assert_close(kept_expert.backward([x], [grad], kept)[0], recomputing.backward([x], [grad])[0])
    # after an update the kept graph is stale: backward recomputes and still agrees
    (_, stale) = kept_expert.forward_keeping([x])
    kept_expert.backward([x], [grad])
    recomputing.backward([x], [grad])
    torch.testing.assert_close(kept_expert.backward([x], [grad], stale)[0], recomputing.backward([x], [grad])[0])
    assert all(torch.equal(a, b) for a, b in zip(kept_expert.module.parameters(), recomputing.module.parameters()))

    cache = ActivationCache(max_entries=2, ttl=60)
    handles = [cache.new_handle() for _ in range(3)]
    for handle in handles:
        cache.put("e", handle, kept)
    assert len(cache) == 2 and cache.pop("e", handles[0]) is None  # the oldest went first
    assert cache.pop("e", handles[2]) is kept and cache.pop("e", handles[2]) is None  # one backward each


def test_a_remote_training_pass_keeps_its_activations_for_the_backward(endpoint: str) -> None:
    remote = RemoteExpert(endpoint, "ffn.0.2", timeout=10)  # never trained: lr applies, compare before
    local = build_local(*EXPERTS[2])
    x = torch.randn(3, HIDDEN)
    x_remote, x_local = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    before = remote.info()
    y = remote(x_remote)
    y.sum().backward()
    local(x_local).sum().backward()
    torch.testing.assert_close(x_remote.grad, x_local.grad, atol=1e-5, rtol=1e-5)
    after = remote.info()
    # the kept forward ran as a batch of its own, and the backward used it (one batch each)
    assert after.forward_batches - before.forward_batches == 1
    assert after.backward_batches - before.backward_batches == 1 and after.updates == before.updates + 1


def test_kinds_resolve_built_ins_and_factories_and_refuse_the_unknown() -> None:
    from apiary.moe.kinds import FailingExpert, FeedForward, SlowFeedForward, resolve_kind

    assert isinstance(resolve_kind("ffn").factory(4), FeedForward)
    slow = resolve_kind("slow", slow_seconds=0.2).factory(4)
    assert isinstance(slow, SlowFeedForward) and slow.delay == 0.2
    assert resolve_kind("transformer").input_ndim == 3
    custom = resolve_kind("apiary.moe.kinds:FeedForward")
    assert isinstance(custom.factory(4), FeedForward) and custom.input_ndim == 2
    with pytest.raises(RuntimeError, match="failing"):
        resolve_kind("failing").factory(4)(torch.randn(2, 4))
    assert isinstance(resolve_kind("failing").factory(4), FailingExpert)
    for bad, message in [("nope", "unknown kind 'nope'"), ("no_such_module:f", "cannot be loaded"),
                         ("apiary.moe.kinds:DEFAULT_SLOW_SECONDS", "neither an ExpertKind nor a callable")]:
        with pytest.raises(ValueError, match=message):
            resolve_kind(bad)


def test_grid_patterns_expand_and_bad_ones_are_named() -> None:
    from apiary.moe.names import expand_expert_names

    assert expand_expert_names("ffn.[0:2].[1:3], ffn.5.0") == ["ffn.0.1", "ffn.0.2", "ffn.1.1", "ffn.1.2", "ffn.5.0"]
    for bad, message in [("ffn", "not on a grid"), ("ffn.[2:2]", "range \\[2:2\\] is empty"),
                         ("ffn.0,ffn.0", "name 'ffn.0' twice"), (" , ", "name no expert"),
                         ("ffn.[0:300].[0:300]", "more than 65536")]:
        with pytest.raises(ValueError, match=message):
            expand_expert_names(bad)


async def test_the_runtime_runs_a_request_alone_when_asked() -> None:
    runtime = BatchingRuntime(max_batch_size=8, max_wait_seconds=0.2)
    runtime.start()
    try:
        seen: list[int] = []

        def record(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            seen.append(tensors[0].shape[0])
            return tensors

        x = torch.zeros(2, 1)
        started = time.monotonic()
        await runtime.submit(("e", "forward"), record, [x], alone=True)
        assert time.monotonic() - started < 0.15  # no waiting for others
        await asyncio.gather(runtime.submit(("e", "forward"), record, [x]),
                             runtime.submit(("e", "forward"), record, [x]),
                             runtime.submit(("e", "forward"), record, [x], alone=True))
        assert seen[1:] == [4, 2], seen  # the two ordinary requests shared a batch; the alone one did not
    finally:
        await runtime.shutdown()

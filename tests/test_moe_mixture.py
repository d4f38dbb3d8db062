"""RemoteMixtureOfExperts and RemoteSwitchMixtureOfExperts against real expert servers and a real
DHT, all on the remote layers' background loop of this process (real gRPC over loopback)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from prometheus_client import CollectorRegistry

from apiary.dht import DHTNode
from apiary.moe import (
    BatchingRuntime,
    Expert,
    ExpertServer,
    ExpertSpec,
    ExpertTraining,
    ExpertsUnavailable,
    FaultTolerance,
    RemoteMixtureOfExperts,
    RemoteSwitchMixtureOfExperts,
    build_expert,
    run_sync,
)
from apiary.moe.declaration import declare_experts
from apiary.moe.wire_dtypes import WireDtypes
from apiary.moe.kinds import SlowFeedForward
from apiary.wire import Identity, RpcServer, WireSettings

HIDDEN = 8
SLOW_SECONDS = 8.0


def local_copy(name: str) -> torch.nn.Module:
    torch.manual_seed(sum(map(ord, name)))
    return build_expert(ExpertSpec(name, "ffn", HIDDEN))


def hosted(name: str, module: torch.nn.Module | None = None, dtype: str = "float32") -> Expert:
    # lr=0: backward passes leave the weights as they are, so local copies stay exact
    return Expert(ExpertSpec(name, "ffn", HIDDEN, dtype), module if module is not None else local_copy(name),
                  training=ExpertTraining(lr=0.0))


@dataclass
class Swarm:
    dht: DHTNode
    servers: list[tuple[RpcServer, ExpertServer]]

    def address(self, index: int) -> str:
        return str(self.servers[index][0].local_endpoint)


async def _start(groups: list[list[Expert]]) -> Swarm:
    dht = await DHTNode.launch()
    servers = []
    for experts in groups:
        rpc = RpcServer(WireSettings(listen_host="127.0.0.1", bulk=False), Identity.generate(),
                        registry=CollectorRegistry(), metrics_prefix="apiary_expert_server")
        server = ExpertServer(experts, BatchingRuntime(max_batch_size=256, max_wait_seconds=0.001))
        server.attach(rpc)
        await server.start()
        await rpc.start()
        await declare_experts(dht, [e.name for e in experts], str(rpc.local_endpoint), ttl=600)
        servers.append((rpc, server))
    # an expert declared at an address where nobody listens: a dead server
    await declare_experts(dht, ["dense.3.0"], "127.0.0.1:1", ttl=600)
    return Swarm(dht, servers)


async def _stop(swarm: Swarm) -> None:
    for rpc, server in swarm.servers:
        await rpc.stop(0)
        await server.close()
    await swarm.dht.shutdown()


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    groups = [
        [hosted(f"dense.0.{j}") for j in range(3)] + [hosted("mixed.0.0"), hosted("mixed.0.1")],
        [hosted(f"dense.{i}.{j}") for i in (1, 2) for j in range(3)],
        [hosted(f"mixed.1.{j}", SlowFeedForward(HIDDEN, SLOW_SECONDS)) for j in range(2)],
        [Expert(ExpertSpec(f"broken.0.{j}", "failing", HIDDEN)) for j in range(2)],
        # half.i.j: full.i.j's weights, computing in bfloat16
        [hosted(f"{prefix}.{i}.{j}", local_copy(f"full.{i}.{j}"), dtype) for i in range(2) for j in range(3)
         for prefix, dtype in (("half", "bfloat16"), ("full", "float32"))],
    ]
    started = run_sync(_start(groups), 60)
    yield started
    run_sync(_stop(started), 60)


def layer(swarm: Swarm, prefix: str, grid: tuple[int, ...], k_best: int, **tolerance: object) -> RemoteMixtureOfExperts:
    torch.manual_seed(0)
    return RemoteMixtureOfExperts(in_features=HIDDEN, grid_size=grid, dht=swarm.dht, prefix=prefix, k_best=k_best,
                                  beam_size=8, fault_tolerance=FaultTolerance(**tolerance))  # type: ignore[arg-type]


def expected_mixture(moe: RemoteMixtureOfExperts, x: torch.Tensor, declared: set[str], live: set[str]) -> torch.Tensor:
    """The mixture computed locally: every sample's k_best best declared experts, of which those
    alive are mixed by the softmax of their scores."""
    scores = moe.grid_scores(x)
    outputs = []
    for sample in range(x.shape[0]):
        ranked = sorted(declared, key=lambda name: -sum(float(scores[d][sample, int(c)].detach())
                                                         for d, c in enumerate(name.split(".")[1:])))[: moe.k_best]
        ranked = [name for name in ranked if name in live]
        logits = torch.stack([sum(scores[d][sample, int(c)] for d, c in enumerate(name.split(".")[1:]))
                              for name in ranked])
        weights = torch.softmax(logits, 0)
        outputs.append(sum(w * local_copy(name)(x[sample : sample + 1])[0] for w, name in zip(weights, ranked)))
    return torch.stack(outputs)


def test_the_mixture_and_its_gradients_equal_the_local_computation(swarm: Swarm) -> None:
    moe = layer(swarm, "dense", (4, 3), k_best=3, forward_timeout=10, backward_timeout=10)
    live = {f"dense.{i}.{j}" for i in range(3) for j in range(3)}
    x = torch.randn(16, HIDDEN)
    x_remote, x_local = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_remote = moe(x_remote)
    y_local = expected_mixture(moe, x_local, live | {"dense.3.0"}, live)  # dense.3.0's server is dead
    torch.testing.assert_close(y_remote, y_local, atol=1e-5, rtol=1e-5)

    weights = torch.randn_like(y_local)
    (y_remote * weights).sum().backward()
    gate_grad = moe.gate.weight.grad.clone()
    moe.zero_grad()
    (y_local * weights).sum().backward()
    torch.testing.assert_close(x_remote.grad, x_local.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gate_grad, moe.gate.weight.grad, atol=1e-5, rtol=1e-5)


def rpc_calls(rpc: RpcServer) -> dict[str, float]:
    assert rpc.metrics is not None
    return {sample.labels["method"]: sample.value for metric in rpc.metrics.requests.collect()
            for sample in metric.samples if sample.name.endswith("_total")}


def test_each_server_gets_one_call_per_pass(swarm: Swarm) -> None:
    moe = layer(swarm, "dense", (3, 3), k_best=4)
    before = [rpc_calls(rpc) for rpc, _ in swarm.servers[:2]]
    moe(torch.randn(64, HIDDEN)).sum().backward()
    for (rpc, _), calls_before in zip(swarm.servers[:2], before):
        calls = rpc_calls(rpc)
        for method in ("ForwardMany", "BackwardMany"):
            assert calls[method] - calls_before.get(method, 0) == 1, f"{method}: {calls} (before: {calls_before})"
        assert calls.get("Forward", 0) == calls_before.get("Forward", 0)


def test_a_slow_expert_costs_at_most_the_forward_timeout(swarm: Swarm) -> None:
    moe = layer(swarm, "mixed", (2, 2), k_best=4, forward_timeout=1.5, timeout_after_k_min=30, backward_timeout=5)
    x = torch.randn(6, HIDDEN, requires_grad=True)
    started = time.monotonic()
    y = moe(x)
    elapsed = time.monotonic() - started
    assert 1.4 < elapsed < 1.5 + 1.5, f"the forward pass took {elapsed:.2f} s with forward_timeout=1.5"
    everyone = {"mixed.0.0", "mixed.0.1", "mixed.1.0", "mixed.1.1"}
    torch.testing.assert_close(y, expected_mixture(moe, x, everyone, {"mixed.0.0", "mixed.0.1"}), atol=1e-5, rtol=1e-5)
    started = time.monotonic()
    y.sum().backward()  # only the experts that answered are asked
    assert time.monotonic() - started < 3
    assert x.grad is not None and moe.gate.weight.grad is not None


def test_after_k_min_answers_the_pass_waits_only_timeout_after_k_min(swarm: Swarm) -> None:
    moe = layer(swarm, "mixed", (2, 2), k_best=4, k_min=2, forward_timeout=30, timeout_after_k_min=0.3)
    started = time.monotonic()
    with torch.no_grad():
        y = moe(torch.randn(4, HIDDEN))
    elapsed = time.monotonic() - started
    assert elapsed < 0.3 + 2.0, f"the forward pass took {elapsed:.2f} s after k_min answers"
    assert y.shape == (4, HIDDEN) and torch.isfinite(y).all()


def test_failed_experts_are_masked_and_too_few_answers_are_an_error(swarm: Swarm) -> None:
    # the dense grid's row 3 is dead; broken.* fail on every pass
    moe = layer(swarm, "broken", (1, 2), k_best=2)
    with pytest.raises(ExpertsUnavailable, match="16 of 16 samples got fewer than k_min=1.*failing"), torch.no_grad():
        moe(torch.randn(16, HIDDEN))
    tolerant = layer(swarm, "broken", (1, 2), k_best=2, allow_zero_outputs=True)
    x = torch.randn(16, HIDDEN, requires_grad=True)
    y = tolerant(x)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))

    nobody = layer(swarm, "nothing", (2, 2), k_best=2)
    with pytest.raises(ExpertsUnavailable, match="no live expert found"), torch.no_grad():
        nobody(torch.randn(3, HIDDEN))


def test_the_switch_layer_routes_each_sample_to_one_expert_and_balances_load(swarm: Swarm) -> None:
    torch.manual_seed(1)
    switch = RemoteSwitchMixtureOfExperts(in_features=HIDDEN, grid_size=(3, 3), dht=swarm.dht, prefix="dense",
                                          beam_size=4, fault_tolerance=FaultTolerance(forward_timeout=10))
    x = torch.randn(32, HIDDEN, requires_grad=True)
    y, balance = switch(x)
    scores = [s.detach() for s in switch.grid_scores(x)]
    probabilities = [torch.softmax(s, -1) for s in switch.grid_scores(x)]
    best = [max(((i, j) for i in range(3) for j in range(3)), key=lambda c: float(scores[0][n, c[0]] + scores[1][n, c[1]]))
            for n in range(32)]
    expected = torch.stack([probabilities[0][n, i] * probabilities[1][n, j] * local_copy(f"dense.{i}.{j}")(x[n : n + 1])[0]
                            for n, (i, j) in enumerate(best)])
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    load = [torch.bincount(torch.tensor([c[d] for c in best]), minlength=3).float() / 32 for d in range(2)]
    torch.testing.assert_close(balance, sum(3 * (load[d] * probabilities[d].mean(0)).sum() for d in range(2)))
    (y.sum() + balance).backward()
    assert switch.gate.weight.grad is not None and switch.gate.weight.grad.abs().sum() > 0
    assert x.grad is not None


@pytest.mark.parametrize("switch", [False, True], ids=["mixture", "switch"])
def test_half_precision_experts_are_called_in_their_dtype_with_half_the_bytes(swarm: Swarm, switch: bool) -> None:
    """The same pass through bfloat16 experts and through float32 experts of the same weights."""
    def make(prefix: str) -> RemoteMixtureOfExperts:
        torch.manual_seed(0)  # the same gate
        options = {"in_features": HIDDEN, "grid_size": (2, 3), "dht": swarm.dht, "prefix": prefix, "beam_size": 8,
                   "fault_tolerance": FaultTolerance(forward_timeout=10, backward_timeout=10), "dtypes": WireDtypes()}
        return RemoteSwitchMixtureOfExperts(**options) if switch else RemoteMixtureOfExperts(k_best=3, **options)

    half, full = make("half"), make("full")
    x, weights = torch.randn(256, HIDDEN), torch.randn(256, HIDDEN)

    def step(moe: RemoteMixtureOfExperts) -> tuple[torch.Tensor, ...]:
        moe.zero_grad()
        x_in = x.clone().requires_grad_(True)
        y = moe(x_in)
        y = y[0] if switch else y
        (y * weights).sum().backward()
        return y.detach(), x_in.grad, moe.gate.weight.grad

    step(half)  # sent in float32: each expert's answer names its dtype
    sent, received = half.traffic.sent, half.traffic.received
    results, expected = step(half), step(full)
    ratio_sent = (half.traffic.sent - sent) / full.traffic.sent
    ratio_received = (half.traffic.received - received) / full.traffic.received
    assert half.dtypes.get(swarm.address(4), "half.0.0") == torch.bfloat16
    assert ratio_sent < 0.55 and ratio_received < 0.55, (ratio_sent, ratio_received)
    for what, got, want in zip(("output", "input gradient", "gate gradient"), results, expected):
        assert got.dtype == torch.float32, what  # the caller's dtype
        error = float((got - want).norm() / want.norm())
        assert error < 0.02, f"{what}: relative error {error:.4f} vs float32"  # bfloat16: 8 bits of mantissa

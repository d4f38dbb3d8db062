"""`apiary expert-server` as participants run it: real processes, a real DHT, the test as the trainer.

A dht process and three expert servers host a 3×4 grid of experts; the test trains a
mixture-of-experts classifier on scikit-learn's digits through them, kills one server halfway
and still reaches 90% test accuracy. Other tests check the metrics, the one-line errors of a
bad configuration and that a restarted server resumes from its checkpoint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from service_processes import ServiceProcess, ServiceProcesses, free_port
from torch import nn

from apiary.dht import DHTNode, DHTSettings
from apiary.moe import Expert, ExpertSpec, ExpertTraining, FaultTolerance, RemoteExpert, RemoteMixtureOfExperts, run_sync
from apiary.moe.checkpoints import load_checkpoints
from apiary.wire import NotFound, OverLimit, PeerAddress, RequestRejected

HIDDEN = 32
SERVED = r"experts served at: (\S+)"


@dataclass
class Swarm:
    services: ServiceProcesses
    dht: ServiceProcess
    servers: list[ServiceProcess]
    addresses: list[str]
    trainer_dht: DHTNode

    def start_server(self, *args: str) -> tuple[ServiceProcess, str]:
        server = self.services.start("expert-server", *args, "--initial-peers", self.dht.initial_peers)
        return server, server.wait_for_line(SERVED).group(1)


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    with ServiceProcesses() as services:
        dht = services.start("dht", "--new-swarm").wait_until_up()
        started = [services.start("expert-server", "--experts", f"digits.{i}.[0:4]", "--hidden-size", str(HIDDEN),
                                  "--lr", "0.003", "--declare-period", "1", "--max-wait", "0.001",
                                  "--initial-peers", dht.initial_peers) for i in range(3)]
        addresses = [server.wait_for_line(SERVED).group(1) for server in started]  # started together: imports overlap
        trainer_dht = run_sync(DHTNode.launch([PeerAddress.parse(dht.initial_peers)],
                                              settings=DHTSettings(client_mode=True)), 30)
        try:
            yield Swarm(services, dht, started, addresses, trainer_dht)
        finally:
            run_sync(trainer_dht.shutdown(), 30)


def metric_samples(service: ServiceProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = service.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_servers_serve_count_and_refuse_bad_requests(swarm: Swarm) -> None:
    server, address = swarm.servers[0], swarm.addresses[0]
    assert server.get("/readyz").status_code == 200  # declared in the DHT
    remote = RemoteExpert(address, "digits.0.1", timeout=10)
    x = torch.randn(5, HIDDEN, requires_grad=True)
    remote(x).sum().backward()
    with pytest.raises(RequestRejected, match=r"expert 'digits.0.1': input shape is \[5, 7\]"), torch.no_grad():
        remote(torch.randn(5, 7))
    with pytest.raises(NotFound, match="expert 'digits.9.9' is not hosted here"), torch.no_grad():
        RemoteExpert(address, "digits.9.9", timeout=10)(x)
    with pytest.raises(OverLimit, match="1025 samples; the limit is max_batch_size=1024"), torch.no_grad():
        remote(torch.randn(1025, HIDDEN))
    assert remote.info().updates == 1  # still serving

    samples = metric_samples(server)
    def requests(kind: str, method: str, status: str) -> float:
        return samples[("apiary_expert_server_requests_total", (("kind", kind), ("method", method), ("status", status)))]
    assert requests("ffn", "forward", "ok") >= 1 and requests("ffn", "backward", "ok") >= 1
    assert requests("ffn", "forward", "invalid_argument") == 1
    assert requests("ffn", "forward", "resource_exhausted") == 1
    assert requests("unknown", "forward", "not_found") == 1
    assert requests("ffn", "info", "ok") >= 1
    assert samples[("apiary_expert_server_experts", ())] == 4
    for method in ("forward", "backward"):
        assert samples[("apiary_expert_server_batch_size_count", (("method", method),))] >= 1
        assert samples[("apiary_expert_server_batch_size_sum", (("method", method),))] >= 5
        assert samples[("apiary_expert_server_queue_seconds_count", (("method", method),))] >= 1
        assert samples[("apiary_expert_server_compute_seconds_count", (("method", method),))] >= 1
    assert samples[("apiary_expert_server_rpc_requests_total", (("code", "OK"), ("method", "Forward")))] >= 1
    status = server.status()
    assert status["experts"] == 4 and status["kind"] == "ffn" and status["device"] == "cpu"
    assert status["declared_at"] is not None and status["updates"] >= 1


def test_a_digits_classifier_trains_through_three_servers_and_survives_losing_one(swarm: Swarm) -> None:
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    x_all = torch.tensor(features / 16.0, dtype=torch.float32)
    y_all = torch.tensor(labels)
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    moe = RemoteMixtureOfExperts(
        in_features=HIDDEN, grid_size=(3, 4), dht=swarm.trainer_dht, prefix="digits", k_best=3,
        fault_tolerance=FaultTolerance(k_min=1, forward_timeout=5, backward_timeout=5, timeout_after_k_min=0.5,
                                       allow_zero_outputs=True),
    )
    model = nn.ModuleDict({"embed": nn.Linear(64, HIDDEN), "moe": moe, "head": nn.Linear(HIDDEN, 10)})

    def classify(x: torch.Tensor) -> torch.Tensor:
        return model["head"](model["moe"](torch.tanh(model["embed"](x))))

    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    epochs, batch = 8, 64
    steps = epochs * ((len(train) + batch - 1) // batch)
    step, slowest_after_kill, victim = 0, 0.0, swarm.servers[2]
    generator = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        for indices in train[torch.randperm(len(train), generator=generator)].split(batch):
            if step == steps // 2:
                assert victim.status()["updates"] > 0  # its experts were in use
                victim.process.kill()
                victim.process.wait(10)
            started = time.monotonic()
            loss = nn.functional.cross_entropy(classify(x_all[indices]), y_all[indices])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step >= steps // 2:
                slowest_after_kill = max(slowest_after_kill, time.monotonic() - started)
            step += 1
    with torch.no_grad():
        accuracy = (classify(x_all[test]).argmax(1) == y_all[test]).float().mean().item()
    assert accuracy >= 0.9, f"test accuracy {accuracy:.3f}"
    assert slowest_after_kill < 5 + 5, f"a training step took {slowest_after_kill:.1f} s after the kill"
    for survivor in swarm.servers[:2]:
        assert survivor.status()["updates"] > 0


def test_a_restarted_server_resumes_from_its_checkpoint(swarm: Swarm, tmp_path: Path) -> None:
    kind = "apiary.moe.kinds:FeedForward"  # a custom kind, loaded as package.module:factory
    args = ("--experts", "ckpt.0.[0:2]", "--kind", kind, "--hidden-size", "16", "--lr", "0.01",
            "--checkpoint-dir", str(tmp_path / "checkpoints"), "--checkpoint-period", "600", "--max-wait", "0")
    server, address = swarm.start_server(*args)
    generator = torch.Generator().manual_seed(3)
    x, grads = torch.randn(8, 16, generator=generator), [torch.randn(8, 16, generator=generator) for _ in range(4)]
    remote = RemoteExpert(address, "ckpt.0.0", timeout=10)
    for grad in grads[:3]:
        remote.call("Backward", [x, grad])
    with torch.no_grad():
        before = remote(x)
    assert server.terminate() == 0  # saves every checkpoint at shutdown
    saved = tmp_path / "saved"
    shutil.copytree(tmp_path / "checkpoints", saved)

    restarted, address = swarm.start_server(*args)
    remote = RemoteExpert(address, "ckpt.0.0", timeout=10)
    with torch.no_grad():
        torch.testing.assert_close(remote(x), before, atol=0, rtol=0)  # same weights
    assert remote.info().updates == 3
    # the same optimizer step: one more update equals the saved state's next update done locally
    local = Expert(ExpertSpec("ckpt.0.0", kind, 16), training=ExpertTraining(lr=0.01))
    load_checkpoints({"ckpt.0.0": local}, saved)
    local.backward([x], [grads[3]])
    remote.call("Backward", [x, grads[3]])
    with torch.no_grad():
        torch.testing.assert_close(remote(x), local.forward([x])[0], atol=1e-5, rtol=1e-5)
    restarted.terminate()


def test_a_server_trains_its_experts_with_the_optimizer_and_schedule_asked(swarm: Swarm) -> None:
    server, address = swarm.start_server("--experts", "sgd.0.0", "--hidden-size", "16", "--optimizer", "sgd",
                                         "--lr", "0.05", "--momentum", "0.9", "--scheduler", "cosine",
                                         "--warmup-steps", "1", "--total-steps", "3", "--max-wait", "0")
    remote = RemoteExpert(address, "sgd.0.0", timeout=10)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(8, 16, generator=generator)
    outputs = []
    for _ in range(4):
        with torch.no_grad():
            outputs.append(remote(x))
        remote.call("Backward", [x, torch.randn(8, 16, generator=generator)])
    assert remote.info().updates == 4
    # learning rates 0.05 (warm-up), 0.025, then 0 from the third update on (cosine at total_steps)
    assert not torch.allclose(outputs[1], outputs[0]) and not torch.allclose(outputs[2], outputs[1])
    torch.testing.assert_close(outputs[3], outputs[2], atol=0, rtol=0)
    server.terminate()


def test_a_bfloat16_server_is_called_in_bfloat16_by_clients_that_follow_its_schema(swarm: Swarm) -> None:
    server, address = swarm.start_server("--experts", "half.0.0", "--hidden-size", "16", "--dtype", "bfloat16",
                                         "--lr", "0", "--max-wait", "0")
    assert "in bfloat16" in server.output
    half, full = RemoteExpert(address, "half.0.0", timeout=10, dtype=None), RemoteExpert(address, "half.0.0", timeout=10)
    x = torch.randn(32, 16, requires_grad=True)
    half(x).sum().backward()
    half_grad, x.grad = x.grad, None
    full(x).sum().backward()  # float32 on the wire: the server still computes in bfloat16
    assert half.wire_dtype() == torch.bfloat16
    torch.testing.assert_close(half_grad, x.grad, atol=2e-2, rtol=2e-2)
    assert half.bytes_sent < 0.55 * full.bytes_sent
    server.terminate()


def test_servers_given_the_same_pattern_spread_over_it(swarm: Swarm) -> None:
    args = ("--experts", "spread.0.[0:6]", "--num-experts", "2", "--hidden-size", "8", "--declare-period", "1")
    started = [swarm.services.start("expert-server", *args, "--initial-peers", swarm.dht.initial_peers)
               for _ in range(3)]  # at the same moment: they race for the same names
    chosen = [server.wait_for_line(r"free in the DHT: (.+)$").group(1).split(", ") for server in started]
    addresses = [server.wait_for_line(SERVED).group(1) for server in started]
    assert all(len(names) == 2 for names in chosen)
    assert sorted(sum(chosen, [])) == [f"spread.0.{j}" for j in range(6)]  # no name hosted twice
    with torch.no_grad():
        RemoteExpert(addresses[0], chosen[0][1], timeout=10)(torch.randn(2, 8))
    late = swarm.services.start("expert-server", *args, "--initial-peers", swarm.dht.initial_peers)
    assert late.process.wait(60) != 0
    last = late.stderr().strip().splitlines()[-1]
    assert last.startswith("apiary: error:") and "2 experts asked, but only 0 of the 6 the pattern names are free" in last
    for server in started:
        server.terminate()


@pytest.mark.timeout(300)
def test_a_restarted_server_takes_back_the_experts_it_declared(swarm: Swarm, tmp_path: Path) -> None:
    """Restarted at once (same identity and address), its names are still declared at its own
    address: it hosts them again (so their checkpoints with them), rather than finding them taken."""
    args = ("--experts", "again.0.[0:6]", "--num-experts", "3", "--hidden-size", "8", "--identity",
            str(tmp_path / "server.key"), "--port", str(free_port()), "--checkpoint-dir", str(tmp_path / "experts"),
            "--initial-peers", swarm.dht.initial_peers)
    first = swarm.services.start("expert-server", *args)
    chosen = first.wait_for_line(r"free in the DHT: (.+)$").group(1)
    first.wait_for_line(SERVED)
    first.terminate()
    again = swarm.services.start("expert-server", *args)
    assert again.wait_for_line(r"free in the DHT: (.+)$").group(1) == chosen
    again.wait_for_line(SERVED)
    again.terminate()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--experts", "ffn.[3:1]", "--initial-peers", "127.0.0.1:1"], "range [3:1] is empty"),
        (["--experts", "ffn.0.0"], "--dht-local"),
        (["--experts", "ffn.0.0", "--initial-peers", "127.0.0.1:1", "--kind", "no_such_module:factory"],
         "expert kind 'no_such_module:factory' cannot be loaded"),
        (["--experts", "ffn.0.0", "--initial-peers", "127.0.0.1:1", "--device", "quantum"], "unknown device 'quantum'"),
        pytest.param(["--experts", "ffn.0.0", "--initial-peers", "127.0.0.1:1", "--device", "cuda"],
                     "CUDA is not available", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")),
        (["--experts", "ffn.0.0", "--initial-peers", "127.0.0.1:1", "--scheduler", "cosine", "--warmup-steps", "10"],
         "the cosine scheduler decays until total_steps, which must exceed warmup_steps=10; got None"),
        (["--experts", "ffn.0.[0:2]", "--initial-peers", "127.0.0.1:1", "--num-experts", "3"],
         "num_experts=3 is more than the 2 experts named"),
        (["--experts", "ffn.0.0", "--initial-peers", "127.0.0.1:1", "--dtype", "float64"], "dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    ],
    ids=["pattern", "no-dht", "kind", "device", "cuda", "scheduler", "num-experts", "dtype"],
)
def test_a_bad_configuration_stops_with_one_clear_line(args: list[str], named: str) -> None:
    result = subprocess.run([sys.executable, "-m", "apiary.cli.main", "expert-server", *args], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "COLUMNS": "400"})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("apiary: error:") and named in lines[0], lines[0]

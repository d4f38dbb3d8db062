"""Hostile and failing peers of a mixture of experts, with real processes over real sockets
(docs/hostile-internet.md, sections 3 and 6).

A dht process and three `apiary expert-server` processes, each with an embedded DHT node (as
`apiary up` runs them), host the 3×2 grid `ffn` (server i hosts row i); the test process is
the trainer. An attacker sends NaN and infinite tensors to an expert; then one server is
SIGKILLed and another frozen with SIGSTOP while the trainer keeps training.
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from service_processes import ServiceProcess, ServiceProcesses
from torch import nn

from apiary.dht import DHTNode, DHTSettings
from apiary.moe import FaultTolerance, RemoteExpert, RemoteMixtureOfExperts, run_sync
from apiary.moe.client import shared_pool
from apiary.moe.protos.moe_pb2 import ExpertCalls, ExpertRequest, ExpertResults
from apiary.moe.server import EXPERTS_SERVICE
from apiary.wire import PeerAddress, RequestRejected, RpcClient
from apiary.wire.tensors import serialize_tensor

HIDDEN = 16
SERVED = r"experts served at: (\S+)\s+admin: (\S+)"


@dataclass
class Server:
    process: ServiceProcess
    address: str
    admin: str

    def metric(self, name: str, **labels: str) -> float:
        text = self.process.get("/metrics").text
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


@dataclass
class Swarm:
    dht: ServiceProcess
    servers: list[Server]
    trainer_dht: DHTNode


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    with ServiceProcesses() as services:
        dht = services.start("dht").wait_until_up()
        started = [services.start("expert-server", "--experts", f"ffn.{row}.[0:2]", "--hidden-size", str(HIDDEN),
                                  "--device", "cpu", "--lr", "0.01", "--max-wait", "0.001", "--declare-period", "30",
                                  "--initial-peers", dht.initial_peers) for row in range(3)]
        servers = [Server(process, *process.wait_for_line(SERVED).groups()) for process in started]
        for server in servers:  # declared in the DHT
            deadline = time.monotonic() + 60
            while server.process.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, server.process.stderr()
                time.sleep(0.2)
        trainer_dht = run_sync(DHTNode.launch([PeerAddress.parse(dht.initial_peers)],
                                              settings=DHTSettings(client_mode=True)), 30)
        try:
            yield Swarm(dht, servers, trainer_dht)
        finally:
            for server in servers:  # a frozen process is resumed, so that it can be killed and reaped
                if server.process.process.poll() is None:
                    os.kill(server.process.pid, signal.SIGCONT)
            run_sync(trainer_dht.shutdown(), 30)


def refusal(call: Callable[[], object]) -> str:
    """The message of the INVALID_ARGUMENT the call got, or what it answered instead."""
    try:
        answer = call()
    except RequestRejected as e:
        return str(e)
    return f"answered {answer}"


def backward_many(address: str, expert: str, tensors: list[torch.Tensor]) -> ExpertResults:
    async def call() -> ExpertResults:
        peer = PeerAddress.parse(address)
        client = RpcClient(shared_pool(), EXPERTS_SERVICE, peer.endpoint, timeout=10, peer_id=peer.peer_id)
        request = ExpertRequest(expert=expert, tensors=[serialize_tensor(t) for t in tensors])
        return await client.call("BackwardMany", ExpertCalls(calls=[request]))

    return run_sync(call(), 15)


def test_nan_and_infinite_tensors_are_refused_and_never_reach_the_expert(swarm: Swarm) -> None:
    server = swarm.servers[0]
    expert = RemoteExpert(server.address, "ffn.0.0", timeout=10)
    x = torch.randn(8, HIDDEN)
    (clean,) = expert.call("Forward", [x])
    updates = expert.info().updates
    nan_x = x.clone()
    nan_x[3, 5] = float("nan")
    inf_grad = torch.ones_like(x)
    inf_grad[0, 0] = float("inf")
    huge_grad = torch.full_like(x, 3e38)  # finite, but its square overflows float32

    refusals = {
        "forward of a NaN input": refusal(lambda: expert.call("Forward", [nan_x])),
        "backward of a NaN input": refusal(lambda: expert.call("Backward", [nan_x, torch.ones_like(x)])),
        "backward of an infinite gradient": refusal(lambda: expert.call("Backward", [x, inf_grad])),
    }
    (overflowed,) = expert.call("Backward", [x, huge_grad])  # answered; the expert's step is skipped
    (many,) = backward_many(server.address, "ffn.0.0", [x, inf_grad]).results

    # what every trainer of the swarm sees next: the expert's answer to a clean input is unchanged
    (after,) = expert.call("Forward", [x])
    assert torch.isfinite(after).all(), f"the expert answers non-finite outputs to clean inputs: {after}"
    assert torch.equal(after, clean)
    assert expert.info().updates == updates
    assert "'ffn.0.0': Forward: the input holds NaN or infinite values" in refusals["forward of a NaN input"]
    assert "'ffn.0.0': Backward: the input holds NaN or infinite values" in refusals["backward of a NaN input"]
    assert "Backward: the output gradient holds NaN or infinite values" in refusals["backward of an infinite gradient"]
    assert torch.isfinite(overflowed).all()
    assert many.code == "INVALID_ARGUMENT" and "the output gradient holds NaN" in many.error, many
    assert server.metric("apiary_expert_server_skipped_updates_total", kind="ffn") == 1  # the overflow
    assert server.metric("apiary_expert_server_requests_total", method="backward", status="invalid_argument") >= 3
    # and it still trains on clean gradients
    expert.call("Backward", [x, torch.ones_like(x)])
    assert expert.info().updates == updates + 1

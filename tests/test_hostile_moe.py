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
from dht_swarm import Swarm as DHTSwarm
from net.moe_client import ObservedMixture
from prometheus_client.parser import text_string_to_metric_families
from service_processes import ServiceProcess, ServiceProcesses
from torch import nn

from apiary.dht import DHTNode, DHTSettings
from apiary.moe import FaultTolerance, RemoteExpert, run_sync
from apiary.moe.bans import ServerBans
from apiary.moe.client import shared_pool
from apiary.moe.protos.moe_pb2 import ExpertCalls, ExpertRequest, ExpertResults
from apiary.moe.server import EXPERTS_SERVICE
from apiary.wire import ChannelPool, PeerAddress, PeerUnavailable, RequestRejected, RpcClient
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
        dht = services.start("dht", "--new-swarm").wait_until_up()
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


def call_many(address: str, method: str, calls: list[ExpertRequest]) -> ExpertResults:
    async def call() -> ExpertResults:
        peer = PeerAddress.parse(address)
        client = RpcClient(shared_pool(), EXPERTS_SERVICE, peer.endpoint, timeout=10, peer_id=peer.peer_id)
        return await client.call(method, ExpertCalls(calls=calls))

    return run_sync(call(), 15)


def backward_many(address: str, expert: str, tensors: list[torch.Tensor]) -> ExpertResults:
    return call_many(address, "BackwardMany", [ExpertRequest(expert=expert, tensors=[serialize_tensor(t) for t in tensors])])


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


def test_calls_off_the_experts_schema_are_refused_one_by_one_and_the_server_keeps_serving(swarm: Swarm) -> None:
    server = swarm.servers[1]
    x = torch.randn(4, HIDDEN)

    def request(*tensors: torch.Tensor, keywords: tuple[str, ...] = ()) -> ExpertRequest:
        return ExpertRequest(expert="ffn.1.0", tensors=[serialize_tensor(t) for t in tensors], keywords=keywords)

    calls = {
        "two inputs": (request(x, x), "takes 1 positional input tensor (float32[batch, 16]), got 2"),
        "an unknown keyword": (request(x, x, keywords=("mask",)), "unknown keyword input 'mask' (it takes none)"),
        "a long unknown keyword": (request(x, x, keywords=("m" * 100_000,)), f"unknown keyword input '{'m' * 64}' "),
        "more keywords than tensors": (request(x, keywords=("a", "b")), "takes 1 positional input tensor"),
        "a boolean input": (request(x > 0), "input dtype is bool, expected float32"),
        "a scalar": (request(torch.tensor(1.0)), "input shape is [], expected float32[batch, 16]"),
        "a clean call": (request(x), ""),
    }
    results = call_many(server.address, "ForwardMany", [call for call, _ in calls.values()]).results
    for (what, (_, message)), result in zip(calls.items(), results):
        if message:
            assert result.code == "INVALID_ARGUMENT" and message in result.error and "'ffn.1.0'" in result.error, \
                (what, result.code, result.error)
        else:
            assert not result.code and len(result.tensors) == 1 and result.dtype == "float32", (what, result.error)
    (grad,) = RemoteExpert(server.address, "ffn.1.0", timeout=10).call("Backward", [x, torch.ones_like(x)])
    assert grad.shape == x.shape


STEP_TIMEOUT = 1.0  # the mixture's timeouts: forward, backward, DHT search; and how long a pass waits for more
# answers after k_min (a frozen server that is still called costs each step that second)


def train(moe: ObservedMixture, steps: int) -> list[dict[str, object]]:
    """`steps` training steps of a small model around `moe`: each step's seconds, the rows of
    the grid that answered, or the error that ended it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, HIDDEN), nn.Tanh(), moe, nn.Linear(HIDDEN, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    record = []
    for _ in range(steps):
        x = torch.randn(16, 8)
        started = time.monotonic()
        try:
            loss = model(x).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        except Exception as e:  # noqa: BLE001 - the step's outcome is what the test reads
            record.append({"seconds": time.monotonic() - started, "error": f"{type(e).__name__}: {e}"})
        else:
            rows = sorted(int(row) for row, count in moe.answered.items() if count)
            record.append({"seconds": time.monotonic() - started, "answered": rows})
    return record


def median_seconds(steps: list[dict[str, object]]) -> float:
    return statistics.median(float(step["seconds"]) for step in steps)  # type: ignore[arg-type]


def test_a_killed_and_a_frozen_server_cost_no_step_time(swarm: Swarm) -> None:
    tolerance = FaultTolerance(k_min=2, forward_timeout=STEP_TIMEOUT, backward_timeout=STEP_TIMEOUT,
                               timeout_after_k_min=STEP_TIMEOUT)
    moe = ObservedMixture(in_features=HIDDEN, grid_size=(3, 2), dht=swarm.trainer_dht, prefix="ffn", k_best=6,
                          fault_tolerance=FaultTolerance(k_min=6, forward_timeout=30, backward_timeout=30),
                          search_timeout=30, bans=ServerBans())
    assert train(moe, 1)[0].get("answered") == [0, 1, 2]  # connected to every server
    moe.fault_tolerance, moe.search_timeout = tolerance, STEP_TIMEOUT
    healthy = train(moe, 4)
    assert all("error" not in step for step in healthy), healthy
    assert any(step["answered"] == [0, 1, 2] for step in healthy), healthy

    _, killed, frozen = swarm.servers
    killed.process.process.kill()
    os.kill(frozen.process.pid, signal.SIGSTOP)
    try:
        failing = train(moe, 12)
    finally:
        os.kill(frozen.process.pid, signal.SIGCONT)
    resumed = time.monotonic()
    print(f"median step: {median_seconds(healthy):.3f} s healthy, {median_seconds(failing):.3f} s with one server "
          f"killed and one frozen, steps: {[round(float(step['seconds']), 2) for step in failing]}")
    assert all("error" not in step for step in failing), failing  # training goes on
    assert all(step["answered"] == [0] for step in failing), failing
    # the frozen server's expert calls and its DHT node's lookups are not waited for, step after step
    assert median_seconds(failing) < median_seconds(healthy) + STEP_TIMEOUT / 2, (healthy, failing)
    assert max(float(step["seconds"]) for step in failing) < 3.0, failing  # type: ignore[arg-type]
    # resumed, the frozen server answers a clean call, and the trainer uses it again once its ban ends
    with torch.no_grad():
        assert torch.isfinite(RemoteExpert(frozen.address, "ffn.2.0", timeout=10)(torch.randn(2, HIDDEN))).all()
    while (step := train(moe, 1)[0]).get("answered") != [0, 2]:
        assert time.monotonic() - resumed < 30, step
        time.sleep(0.5)


def test_a_ban_doubles_with_each_failure_and_an_answer_lifts_it() -> None:
    bans = ServerBans(base_seconds=0.2, max_seconds=0.4)
    failure = PeerUnavailable("connection refused", peer="a")
    bans.outcome("a", failure)
    assert bans.banned("a") and not bans.banned("b") and len(bans) == 1
    time.sleep(0.25)
    assert not bans.banned("a")
    bans.outcome("a", failure)  # a second failure: twice as long
    time.sleep(0.25)
    assert bans.banned("a")
    bans.outcome("a", RequestRejected("refused", peer="a"))  # it answered: alive
    assert not bans.banned("a")


async def test_a_dht_lookup_ends_at_its_deadline_and_the_next_does_not_wait_for_frozen_nodes() -> None:
    with DHTSwarm(workers=3, nodes_per_worker=2, settings={"rpc_timeout": 3.0}) as dht_swarm:
        async with ChannelPool() as pool:
            client = dht_swarm.client(0, pool, timeout=10)
            assert await client.store("ffn.", ["ffn.0.0", "somewhere"], time.time() + 60, subkey=0)
            dht_swarm.freeze_worker(2)  # two of the six nodes stop answering; their sockets stay open
            lookups = []
            for _ in range(3):
                started = time.monotonic()
                found = await client.get("ffn.", latest=True, timeout=1.0)
                lookups.append(time.monotonic() - started)
                assert found is not None and found.value[0].value == ["ffn.0.0", "somewhere"]
    # a lookup that meets a frozen node ends at its deadline, not after the 3 s RPC timeout (each
    # frozen node is met once: the 1st or 2nd lookup); the query to it runs on, and meanwhile the
    # next lookups skip it instead of waiting for it again
    assert max(lookups) < 2.0 and lookups[2] < 0.5, lookups


async def test_a_dht_store_answers_within_the_callers_deadline_when_nodes_are_frozen() -> None:
    """A service's store through its participant's dht (Local/Store) ends in the time the service
    gave it, on the nodes that answered by then, though some of the key's nodes froze: not after
    the lookup and the stores waited out the RPC timeout of each frozen node."""
    with DHTSwarm(workers=3, nodes_per_worker=2, settings={"rpc_timeout": 3.0}) as dht_swarm:
        async with ChannelPool() as pool:
            client = dht_swarm.client(0, pool, timeout=1.5)
            dht_swarm.freeze_worker(2)  # two of the six nodes stop answering; their sockets stay open
            stored = [await client.store(f"frozen.{i}", "value", time.time() + 60) for i in range(3)]
            found = await dht_swarm.client(0, pool, timeout=10).get("frozen.0")
    assert all(stored) and found is not None and found.value == "value"  # (past 1.5 s, DeadlineExceeded)

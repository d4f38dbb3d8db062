"""`apiary averager` as a participant runs it: real processes, with the test as their trainers.

A dht process and three averagers (two with an embedded DHT node, one through the dht service's
local API) form the swarm; the test acts as the three trainers, two handing their tensors over
through shared memory and one through gRPC streaming. A fourth averager started later is the
newcomer that loads the state a trainer published, also once that trainer is gone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from service_processes import APIARY, ServiceProcess, ServiceProcesses

from apiary.averaging.api.client import AveragerClient
from apiary.averaging.api.spec import LOCAL_SERVICE
from apiary.averaging.protos.local_pb2 import AverageSharedRequest, RegisterRequest
from apiary.wire import NotFound, PreconditionFailed, RequestRejected, RpcClient

RUN = "service-test"
SHAPES = [(64, 8), (37,), (3, 2, 5)]
WEIGHTS = [1.0, 2.0, 3.5]
ROUND_OPTIONS = ("--target-group-size", "3", "--min-group-size", "3", "--expected-peers", "3",
                 "--gather-seconds", "1", "--join-seconds", "3", "--round-timeout", "20", "--sender-timeout", "5")
SHM = Path("/dev/shm")


def shm_entries() -> set[str]:
    return {p.name for p in SHM.iterdir()} if SHM.is_dir() else set()


class Swarm:
    def __init__(self, services: ServiceProcesses):
        self.services = services
        self.dht = services.start("dht", "--new-swarm").wait_until_up()
        assert self.dht.initial_peers and self.dht.local_api is not None
        common = ("--run-id", RUN, *ROUND_OPTIONS)
        started = [
            services.start("averager", *common, "--initial-peers", self.dht.initial_peers),
            services.start("averager", *common, "--initial-peers", self.dht.initial_peers),
            services.start("averager", *common, "--dht-local", str(self.dht.local_api)),
        ]
        self.averagers = [a.wait_until_up() for a in started]  # started together: imports run in parallel

    def newcomer(self) -> ServiceProcess:
        return self.services.start("averager", "--run-id", RUN, *ROUND_OPTIONS,
                                   "--initial-peers", self.dht.initial_peers).wait_until_up()


@pytest.fixture(scope="module")
def shm_before() -> set[str]:
    return shm_entries()


@pytest.fixture(scope="module")
def swarm(shm_before: set[str]) -> Iterator[Swarm]:
    with ServiceProcesses() as services:
        yield Swarm(services)


def trainer_tensors(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def metric_samples(service: ServiceProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = service.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_three_trainers_average_through_shared_memory_and_grpc(swarm: Swarm) -> None:
    first = swarm.averagers[0]
    assert first.get("/readyz").status_code == 503  # not ready until a trainer registers
    clients = [AveragerClient(a.local_api, timeout=10, round_timeout=60) for a in swarm.averagers]
    try:
        inputs = [trainer_tensors(seed) for seed in range(3)]
        tensors = [[t.clone() for t in ts] for ts in inputs]
        digests = [await client.register(ts, use_shared_memory=i < 2)
                   for i, (client, ts) in enumerate(zip(clients, tensors))]
        assert len(set(digests)) == 1
        assert clients[0].shared_memory_name and clients[2].shared_memory_name is None
        assert first.get("/readyz").status_code == 200
        maps = Path(f"/proc/{first.pid}/maps")
        if maps.exists():  # the averager maps the trainer's segment
            assert clients[0].shared_memory_name in maps.read_text()

        sizes = await asyncio.wait_for(
            asyncio.gather(*(c.average(ts, weight=w) for c, ts, w in zip(clients, tensors, WEIGHTS))), 90)
        assert sizes == [3, 3, 3], [c.last_outcome for c in clients]
        members = tuple(sorted(a.status()["peer_id"] for a in swarm.averagers))
        assert all(c.last_outcome.members == members for c in clients), [c.last_outcome for c in clients]
        total = sum(WEIGHTS)
        for index, expected in enumerate(
            sum(w * x.double() for w, x in zip(WEIGHTS, parts)) / total for parts in zip(*inputs)
        ):
            for trainer in range(3):
                torch.testing.assert_close(tensors[trainer][index].double(), expected, atol=1e-6, rtol=1e-6)

        for averager, client in zip(swarm.averagers, clients):
            samples = metric_samples(averager)
            assert samples[("apiary_averager_rounds_total", (("result", "ok"),))] >= 1
            assert samples[("apiary_averager_sent_bytes_total", ())] > 0
            assert samples[("apiary_averager_received_bytes_total", ())] > 0
            assert samples[("apiary_averager_group_size_count", ())] >= 1
            assert samples[("apiary_averager_round_seconds_count", (("result", "ok"),))] >= 1
            status = averager.status()
            assert status["run_id"] == RUN and status["mode"] == "node" and status["registered"] is True
            assert (status["codec"], status["state_codec"], status["download_codec"]) == ("none", "none", "none")
            assert status["schema"]["digest"] == digests[0]
            assert status["schema"]["numel"] == sum(torch.Size(s).numel() for s in SHAPES)
            assert status["schema"]["listed"][1] == {"dtype": "float32", "shape": [37]}
            assert status["schema"]["shared_memory"] == client.shared_memory_name
            assert status["last_round"]["result"] == "ok" and status["last_round"]["group_size"] == 3
            assert status["last_round"]["seconds"] > 0
            assert status["donor_epoch"] is None
        assert swarm.averagers[2].status()["dht"].startswith("local API")
    finally:
        for client in clients:
            await client.close()


async def test_a_group_prepared_ahead_makes_the_round_skip_matchmaking(swarm: Swarm) -> None:
    clients = [AveragerClient(a.local_api, timeout=10, round_timeout=60) for a in swarm.averagers]
    try:
        inputs = [trainer_tensors(seed) for seed in range(10, 13)]
        tensors = [[t.clone() for t in ts] for ts in inputs]
        for i, (client, ts) in enumerate(zip(clients, tensors)):
            await client.register(ts, use_shared_memory=i < 2)
        gather = clients[0].matchmaking_seconds - 3  # ROUND_OPTIONS: gather 1 s + join 3 s
        assert gather == pytest.approx(1.0)
        before = [metric_samples(a)[("apiary_averager_groups_formed_early_total", ())] for a in swarm.averagers]
        with pytest.raises(RequestRejected, match="round must be non-negative"):
            await clients[0].prepare(-1)

        assert all(await asyncio.gather(*(c.prepare(40) for c in clients)))  # while the trainers still compute
        assert not await clients[0].prepare(40)  # one group at a time
        await asyncio.sleep(gather + 0.5)
        started = asyncio.get_running_loop().time()
        sizes = await asyncio.wait_for(
            asyncio.gather(*(c.average(ts, weight=w, round=40) for c, ts, w in zip(clients, tensors, WEIGHTS))), 60)
        waited = asyncio.get_running_loop().time() - started
        assert sizes == [3, 3, 3] and all(c.last_outcome.formed_early for c in clients), [c.last_outcome for c in clients]
        assert waited < gather, waited  # no announce-and-gather after the tensors were handed over
        total = sum(WEIGHTS)
        for index, expected in enumerate(
            sum(w * x.double() for w, x in zip(WEIGHTS, parts)) / total for parts in zip(*inputs)
        ):
            for trainer in range(3):
                torch.testing.assert_close(tensors[trainer][index].double(), expected, atol=1e-6, rtol=1e-6)
        after = [metric_samples(a)[("apiary_averager_groups_formed_early_total", ())] for a in swarm.averagers]
        assert [a - b for a, b in zip(after, before)] == [1, 1, 1]

        # a group prepared for a round that never comes is dropped: the next round forms its own
        assert all(await asyncio.gather(*(c.prepare(41) for c in clients)))
        sizes = await asyncio.wait_for(
            asyncio.gather(*(c.average(ts, weight=1.0, round=42) for c, ts in zip(clients, tensors))), 60)
        assert sizes == [3, 3, 3] and not any(c.last_outcome.formed_early for c in clients)
    finally:
        for client in clients:
            await client.close()


async def test_bad_input_is_rejected_clearly_and_the_service_keeps_serving(swarm: Swarm) -> None:
    streamed, shared = swarm.averagers[2], swarm.averagers[1]
    async with AveragerClient(streamed.local_api, timeout=10) as client:
        tensors = trainer_tensors(7)
        await client.register(tensors)
        wrong_shape = [tensors[0], torch.zeros(36), tensors[2]]
        with pytest.raises(RequestRejected, match=r"tensor 1 is float32\[36\], the registered schema has float32\[37\]"):
            await client.average(wrong_shape)
        wrong_dtype = [tensors[0].double(), tensors[1], tensors[2]]
        with pytest.raises(RequestRejected, match=r"tensor 0 is float64\[64, 8\].*float32\[64, 8\]"):
            await client.average(wrong_dtype)
        with pytest.raises(RequestRejected, match="2 tensors sent; the registered schema has 3"):
            await client.average(tensors[:2])
        with pytest.raises(RequestRejected, match="weight must be a finite non-negative number"):
            await client.average(tensors, weight=-1)
        raw = RpcClient(client.pool, LOCAL_SERVICE, streamed.local_api, timeout=10)
        with pytest.raises(PreconditionFailed, match="FAILED_PRECONDITION.*without shared memory"):
            await raw.call("AverageShared", AverageSharedRequest(weight=1.0))
        with pytest.raises(RequestRejected, match="cannot be averaged"):
            await client.register([torch.zeros(3, dtype=torch.int64)])
        with pytest.raises(RequestRejected, match="no shared memory segment named 'apiary_nonexistent'"):
            await raw.call("Register", RegisterRequest(tensors=client.schema.headers(), shm_name="apiary_nonexistent"))
        with pytest.raises(RequestRejected, match="'epoch' must be a non-negative integer"):
            await client.publish_state({"epoch": "five"}, tensors)
        assert await client.register(tensors)  # still serving, still registered
        assert streamed.get("/healthz").status_code == 200
        assert streamed.status()["registered"] is True

        # alone in its round: no group, the tensors stay as they were; the trainer chose the round
        before = [t.clone() for t in tensors]
        assert await asyncio.wait_for(client.average(tensors, round=7), 30) is None
        assert client.last_outcome.result == "no_group"
        assert all(torch.equal(a, b) for a, b in zip(tensors, before))
        status = streamed.status()
        assert status["last_round"]["result"] == "no_group" and status["next_round"] == 8
        assert metric_samples(streamed)[("apiary_averager_rounds_total", (("result", "no_group"),))] >= 1

        # a restarted trainer registers another schema: it replaces the old one
        old = status["schema"]["digest"]
        other = await client.register([torch.zeros(4, 4, dtype=torch.bfloat16)])
        status = streamed.status()
        assert status["schema"]["digest"] == other != old
        assert status["schema"]["listed"] == [{"dtype": "bfloat16", "shape": [4, 4]}]

    async with AveragerClient(shared.local_api, timeout=10) as client:
        await client.register(trainer_tensors(8), use_shared_memory=True)
        with pytest.raises(RequestRejected, match=r"tensor 2 is float32\[5, 3, 2\]"):
            await client.average([*trainer_tensors(8)[:2], torch.zeros(5, 3, 2)])


def assert_bit_exact(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


async def test_a_newcomer_loads_the_published_state_even_after_the_trainer_is_gone(swarm: Swarm) -> None:
    donor = swarm.averagers[0]
    generator = torch.Generator().manual_seed(11)
    state = [torch.randn(300, 7, generator=generator), torch.randn(9, generator=generator).to(torch.bfloat16),
             torch.randint(0, 100, (13,), generator=generator), torch.tensor(2.5, dtype=torch.float64)]
    metadata = {"epoch": 5, "note": "published by trainer 0", "lr": 0.1}
    trainer = AveragerClient(donor.local_api, timeout=10)
    try:
        reply = await trainer.publish_state(metadata, state)
        assert reply.epoch == 5 and reply.tensors == 4 and reply.announced
    finally:
        await trainer.close()  # this trainer is gone from now on

    newcomer = swarm.newcomer()
    async with AveragerClient(newcomer.local_api, timeout=10) as fresh:
        raw = RpcClient(fresh.pool, LOCAL_SERVICE, newcomer.local_api, timeout=10)
        with pytest.raises(PreconditionFailed, match="FAILED_PRECONDITION.*call Register first"):
            await raw.call("AverageShared", AverageSharedRequest(weight=1.0))
        for _ in range(2):
            got_metadata, got = await fresh.load_state(timeout=30)
            assert got_metadata == metadata
            assert_bit_exact(got, state)

    assert donor.status()["donor_epoch"] == 5
    assert donor.status()["donor_tensors"] == 4
    assert metric_samples(donor)[("apiary_averager_state_requests_total", (("result", "ok"),))] >= 2
    assert newcomer.terminate() == 0, newcomer.stderr()


async def test_with_no_donor_load_state_says_not_found_and_a_bad_timeout_is_rejected(swarm: Swarm) -> None:
    lonely = swarm.services.start("averager", "--run-id", "lonely-run", *ROUND_OPTIONS,
                                  "--initial-peers", swarm.dht.initial_peers).wait_until_up()
    async with AveragerClient(lonely.local_api, timeout=10) as client:
        with pytest.raises(NotFound, match=r"LoadState on .* NOT_FOUND: .*no donor is announced"):
            await client.load_state(timeout=1)
        with pytest.raises(RequestRejected, match="timeout must be a positive number of seconds, got -1"):
            await client.load_state(timeout=-1)
    assert lonely.terminate() == 0, lonely.stderr()


async def test_sigterm_stops_every_process_cleanly_and_releases_shared_memory(
    swarm: Swarm, shm_before: set[str]
) -> None:
    client = AveragerClient(swarm.averagers[1].local_api, timeout=10)
    try:
        await client.register(trainer_tensors(3), use_shared_memory=True)  # mapped by the averager as it stops
        assert client.shared_memory_name in shm_entries()
        for service in swarm.averagers:
            service.process.send_signal(signal.SIGTERM)
        for service in swarm.averagers:
            assert service.process.wait(30) == 0, service.stderr()
            assert "Traceback" not in service.stderr(), service.stderr()
            assert "leaked" not in service.stderr() and "still in use" not in service.stderr(), service.stderr()
        assert client.shared_memory_name in shm_entries()  # the trainer's segment: the averager did not unlink it
    finally:
        await client.close()
    assert swarm.dht.terminate() == 0, swarm.dht.stderr()
    leaked = {name for name in shm_entries() - shm_before if name.startswith("apiary_")}
    assert not leaked, f"shared memory left behind: {leaked}"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--run-id", "r", "--initial-peers", "a@127.0.0.1:1", "--mode", "bogus"], "--mode"),
        (["--run-id", "r", "--initial-peers", "a@127.0.0.1:1", "--codec", "zip"], "--codec"),
        (["--run-id", "r", "--initial-peers", "a@127.0.0.1:1", "--state-codec", "quantile9"], "--state-codec"),
        (["--run-id", "r", "--initial-peers", "a@127.0.0.1:1", "--download-codec", "gzip"], "--download-codec"),
        (["--run-id", "r"], "--dht-local"),
        (["--run-id", "r", "--dht-local", "127.0.0.1:1", "--initial-peers", "a@127.0.0.1:1"], "--initial-peers"),
    ],
)
def test_a_bad_configuration_stops_the_averager_with_one_clear_line(args: list[str], named: str) -> None:
    result = subprocess.run([*APIARY, "averager", *args], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apiary: error:") and named in lines[0], result.stderr


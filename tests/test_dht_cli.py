"""`apiary dht` as an operator runs it: two real processes that form a swarm."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from apiary.dht.api import DHTClient
from apiary.wire import ChannelPool, Endpoint

APIARY = [sys.executable, "-m", "apiary.cli.main"]
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class DHTProcess:
    process: subprocess.Popen[str]
    stderr_file: IO[str]
    admin: str = ""
    initial_peers: str = ""
    local_api: Endpoint | None = None
    output: str = ""

    def wait_until_up(self) -> DHTProcess:
        """Reads stdout until the local API line; parses what an operator would copy from it."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        while self.local_api is None:
            assert time.monotonic() < deadline, f"apiary dht did not start: {self.output}{self.stderr()}"
            line = self.process.stdout.readline()
            assert line, f"apiary dht ended early ({self.process.poll()}): {self.output}{self.stderr()}"
            self.output += line
            if match := re.search(r"others join with: --initial-peers (\S+)", line):
                self.initial_peers = match.group(1)
            if match := re.search(r"local API: (\S+)", line):
                self.local_api = Endpoint.parse(match.group(1))
        return self

    def stderr(self) -> str:
        self.stderr_file.seek(0)
        return self.stderr_file.read()

    def status(self) -> dict:
        response = httpx.get(f"{self.admin}/status", timeout=5)
        response.raise_for_status()
        return response.json()

    def neighbours(self) -> set[str]:
        return {n["peer_id"] for n in self.status()["neighbours"]}


@pytest.fixture
def start_dht() -> Iterator[Callable[..., DHTProcess]]:
    """Starts `apiary dht` processes; every one is killed at the end, whatever happened."""
    started: list[DHTProcess] = []

    def start(*args: str) -> DHTProcess:
        admin_port = free_port()
        stderr = tempfile.TemporaryFile("w+")
        process = subprocess.Popen(
            [*APIARY, "dht", "--host", "127.0.0.1", "--port", "0", "--admin-port", str(admin_port), *args],
            stdout=subprocess.PIPE, stderr=stderr, text=True,
            env={**os.environ, "COLUMNS": "400", "PYTHONUNBUFFERED": "1"},
        )
        dht = DHTProcess(process, stderr, admin=f"http://127.0.0.1:{admin_port}")
        started.append(dht)
        return dht

    yield start
    for dht in started:
        if dht.process.poll() is None:
            dht.process.kill()
        dht.process.wait(10)
        if dht.process.stdout is not None:
            dht.process.stdout.close()
        dht.stderr_file.close()


def _eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


async def test_two_dht_processes_find_each_other_share_values_and_stop_on_sigterm(
    start_dht: Callable[..., DHTProcess],
) -> None:
    first = start_dht("--new-swarm").wait_until_up()
    assert re.fullmatch(r"[a-z2-7]+@127\.0\.0\.1:\d+", first.initial_peers), first.output
    second = start_dht("--initial-peers", first.initial_peers).wait_until_up()
    first_id, second_id = first.status()["peer_id"], second.status()["peer_id"]
    assert first.initial_peers.startswith(first_id + "@")

    assert first_id in second.neighbours()
    _eventually(lambda: second_id in first.neighbours(), 10, f"the first node never listed the second: {first.status()}")

    key, value = f"cli-{uuid.uuid4().hex}", {"served_by": "first"}
    async with ChannelPool() as pool:
        assert await DHTClient(first.local_api, pool, timeout=10).store(key, value, time.time() + 60)
        found = await DHTClient(second.local_api, pool, timeout=10).get(key)
    assert found is not None and found.value == value

    metrics = httpx.get(f"{first.admin}/metrics", timeout=5).text
    samples = {s.name: s for family in text_string_to_metric_families(metrics) for s in family.samples}
    assert samples["apiary_dht_routing_table_nodes"].value >= 1
    served = [s for f in text_string_to_metric_families(metrics) for s in f.samples
              if s.name == "apiary_dht_rpc_requests_total"]
    assert served and sum(s.value for s in served) >= 1, "no served RPC counted"
    assert {s.labels["code"] for s in served} == {"OK"}

    for dht in (second, first):
        dht.process.send_signal(signal.SIGTERM)
        assert dht.process.wait(15) == 0, dht.stderr()


def test_an_unreachable_initial_peer_fails_cleanly_and_quickly(start_dht: Callable[..., DHTProcess]) -> None:
    started = time.monotonic()
    dht = start_dht("--initial-peers", "127.0.0.1:1", "--bootstrap-timeout", "2")
    code = dht.process.wait(20)
    elapsed = time.monotonic() - started
    assert code != 0
    last = dht.stderr().strip().splitlines()[-1]
    assert last.startswith("apiary: error:") and "127.0.0.1:1" in last, dht.stderr()
    assert elapsed < 10, f"took {elapsed:.1f}s to give up"

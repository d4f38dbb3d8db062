"""A DHT swarm spread over several real processes, for tests and benchmarks.

    with Swarm(workers=8, nodes_per_worker=4) as swarm:
        async with ChannelPool() as pool:
            client = swarm.client(3, pool)          # DHTClient of node 3's local API
            await client.store("key", "value", time.time() + 60)
        swarm.kill_worker(1)                        # SIGKILL: its nodes vanish without goodbye

Each worker is `tests/dht_swarm_worker.py` running `nodes_per_worker` DHT nodes. All workers
start at once (imports in parallel) and wait; then they are handed their initial peers one
after another, so every node joins through a random node that is already up. On exit (also
when the test fails) every worker is terminated, and killed if it lingers: no process is left.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from apiary.dht.api import DHTClient
from apiary.dht.ids import node_id
from apiary.wire import ChannelPool, Endpoint, PeerAddress

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("dht_swarm_worker.py")


@dataclass(frozen=True)
class SwarmNode:
    """One node of the swarm as the test sees it."""

    index: int
    worker: int
    peer_id: str
    address: str  # peer_id@host:port, what --initial-peers takes
    port: int
    local_port: int

    @property
    def id(self) -> int:
        return node_id(self.peer_id)

    @property
    def peer_address(self) -> PeerAddress:
        return PeerAddress.parse(self.address)

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port)

    @property
    def local_endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.local_port)


@dataclass
class Worker:
    """One worker process and what it reported."""

    index: int
    process: subprocess.Popen[bytes]
    stderr: IO[bytes]
    lines: queue.Queue[bytes | None] = field(default_factory=queue.Queue)
    nodes: list[SwarmNode] = field(default_factory=list)
    down: bool = False  # killed or frozen by the test

    def start_reader(self) -> None:
        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=read, daemon=True).start()

    def next_record(self, deadline: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(f"swarm worker {self.index} did not start in time: {self.stderr_tail()}") from None
        if line is None:
            raise RuntimeError(f"swarm worker {self.index} exited ({self.process.poll()}): {self.stderr_tail()}")
        return json.loads(line)

    def stderr_tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-3000:]

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class Swarm:
    """`workers` processes × `nodes_per_worker` DHT nodes on 127.0.0.1."""

    def __init__(
        self,
        workers: int = 8,
        nodes_per_worker: int = 4,
        *,
        settings: dict[str, Any] | None = None,
        start_timeout: float = 60.0,
        seed: int | None = None,
    ):
        self.num_workers = workers
        self.nodes_per_worker = nodes_per_worker
        self.settings = settings or {}
        self.start_timeout = start_timeout
        self.random = random.Random(seed)
        self.workers: list[Worker] = []
        self.nodes: list[SwarmNode] = []
        self.exit_codes: dict[int, int | None] = {}
        self._closed = False

    # ---- lifecycle ----

    def __enter__(self) -> Swarm:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": _pythonpath()}
        command = [sys.executable, str(WORKER), "--wait-for-peers", "--nodes", str(self.nodes_per_worker),
                   "--settings", json.dumps(self.settings)]
        for index in range(self.num_workers):
            stderr = tempfile.TemporaryFile()
            process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
            worker = Worker(index, process, stderr)
            worker.start_reader()
            self.workers.append(worker)
        deadline = time.monotonic() + self.start_timeout
        for worker in self.workers:
            peers = [self.random.choice(self.nodes).address] if self.nodes else []
            assert worker.process.stdin is not None
            worker.process.stdin.write((json.dumps({"initial_peers": peers}) + "\n").encode())
            worker.process.stdin.flush()
            while True:
                record = worker.next_record(deadline)
                if record.get("ready"):
                    break
                node = SwarmNode(len(self.nodes), worker.index, record["peer_id"], record["address"],
                                 int(record["port"]), int(record["local_port"]))
                worker.nodes.append(node)
                self.nodes.append(node)

    def close(self, timeout: float = 10.0) -> dict[int, int | None]:
        """Asks every worker to stop (SIGTERM), kills those that linger; returns exit codes by worker."""
        if self._closed:
            return self.exit_codes
        self._closed = True
        for worker in self.workers:
            if worker.alive:
                _signal(worker.process, signal.SIGTERM)
                _signal(worker.process, signal.SIGCONT)  # a frozen worker must wake to see it
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(worker.process, signal.SIGKILL)
                worker.process.wait(5)
            self.exit_codes[worker.index] = worker.process.returncode
            for stream in (worker.process.stdin, worker.process.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        return self.exit_codes

    # ---- what tests use ----

    def kill_worker(self, index: int) -> list[SwarmNode]:
        """SIGKILLs a worker (its nodes die without any goodbye); returns its nodes."""
        worker = self.workers[index]
        _signal(worker.process, signal.SIGKILL)
        worker.process.wait(10)
        worker.down = True
        return worker.nodes

    def freeze_worker(self, index: int) -> list[SwarmNode]:
        """SIGSTOPs a worker: its sockets stay open but nothing answers (calls to it time out)."""
        worker = self.workers[index]
        _signal(worker.process, signal.SIGSTOP)
        worker.down = True
        return worker.nodes

    def alive_nodes(self) -> list[SwarmNode]:
        return [node for node in self.nodes if not self.workers[node.worker].down]

    def client(self, node: int | SwarmNode, pool: ChannelPool | None = None, *, timeout: float = 30.0) -> DHTClient:
        """A DHTClient of a node's local API (make the pool inside the test's event loop)."""
        target = self.nodes[node] if isinstance(node, int) else node
        return DHTClient(target.local_endpoint, pool, timeout=timeout)

    def random_node(self, alive_only: bool = True) -> SwarmNode:
        return self.random.choice(self.alive_nodes() if alive_only else self.nodes)

    def stderr_of(self, worker: int) -> str:
        return self.workers[worker].stderr_tail()


def _signal(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        process.send_signal(sig)
    except ProcessLookupError:
        pass


def _pythonpath() -> str:
    src = str(REPO_ROOT / "src")
    existing = os.environ.get("PYTHONPATH", "")
    return f"{src}{os.pathsep}{existing}" if existing else src

"""Peers of the robust-aggregation test, several per process, training a digits classifier.

    python -m tests.trust_training_worker --config '{"peers": [0, 1, 2, 3], ...}'

For every experiment of the config (a run name, an aggregation rule, the attacking peers) and
every peer index in `peers`, this process hosts one participant: its own identity, `RpcServer`
(gRPC + bulk) and `Averager`; the process's participants share one DHT node. Each participant
trains a logistic-regression classifier on scikit-learn's digits: every step it computes the
gradient of a minibatch drawn from the training split (the same batch for a peer and step in
every run), averages it with its run (`Averager.step`), and applies the averaged gradient. Attackers send their gradient sign-flipped
and scaled by 1000, then apply the average like everyone else. Step s of every run starts at
`t0 + s * period`, so all participants are in the same round.

Protocol (JSON lines): stdin `{"initial_peer": ADDRESS | null}`, then (after we print
`{"event": "up", "address"}`) `{"t0": UNIX_TIME}`; stdout at the end:
`{"event": "done", "results": [{"run", "peer", "accuracy", "group_sizes", "errors"}, ...]}`.
Then it serves (others may still need its DHT node or reducers) until stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
from typing import Any

import torch
from averaging_worker import _Stdin
from sklearn.datasets import load_digits

from worker_support import die_with_parent, emit

from apiary.averaging.averager import Averager, AveragerSettings
from apiary.dht import DHTNode
from apiary.wire import Identity, PeerAddress, RpcServer, WireSettings

PEERS = 16
TEST_SAMPLES = 397
BATCH = 128
ATTACK_SCALE = -1000.0


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardized features, labels, the test indices and the training indices (a fixed split)."""
    features, labels = load_digits(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float32)
    x = (x - x.mean(dim=0)) / (x.std(dim=0) + 1.0)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x, torch.tensor(labels), order[:TEST_SAMPLES], order[TEST_SAMPLES:]


def minibatch(train: torch.Tensor, peer: int, step: int) -> torch.Tensor:
    """The training indices a peer uses at a step (the same in every run)."""
    generator = torch.Generator().manual_seed(1000 * step + peer)
    return train[torch.randperm(len(train), generator=generator)[:BATCH]]


class Participant:
    """One peer of one run: a classifier, its gradient buffers (the averaged tensors), an averager."""

    def __init__(self, run: dict[str, Any], peer: int, dht: DHTNode, config: dict[str, Any]):
        self.run, self.peer = run["name"], peer
        self.attacker = peer in run["attackers"]
        self.weight, self.bias = torch.zeros(10, 64), torch.zeros(10)
        self.gradients = [torch.zeros(10, 64), torch.zeros(10)]
        self.identity = Identity.generate()
        self.server = RpcServer(WireSettings(listen_host="127.0.0.1", shutdown_grace=0.2), self.identity)
        settings = AveragerSettings(
            prefix=f"trust-{self.run}", target_group_size=PEERS, min_group_size=2, expected_peers=PEERS,
            gather_seconds=config["gather_seconds"], join_seconds=config["join_seconds"], sender_timeout=3.0,
            round_timeout=10.0, aggregation=run["aggregation"], clip_radius=config["clip_radius"],
            clip_iterations=config["clip_iterations"],
        )
        self.averager = Averager(self.gradients, dht, self.identity.peer_id, settings)
        self.averager.attach(self.server)
        self.group_sizes: list[int | None] = []
        self.errors: list[str] = []

    def compute_gradient(self, x: torch.Tensor, y: torch.Tensor) -> None:
        weight, bias = self.weight.clone().requires_grad_(), self.bias.clone().requires_grad_()
        torch.nn.functional.cross_entropy(x @ weight.T + bias, y).backward()
        assert weight.grad is not None and bias.grad is not None
        scale = ATTACK_SCALE if self.attacker else 1.0
        self.gradients[0].copy_(weight.grad * scale)
        self.gradients[1].copy_(bias.grad * scale)

    async def average(self) -> None:
        try:
            self.group_sizes.append(await self.averager.step())
        except Exception as e:  # noqa: BLE001 - reported to the test; the local gradient is applied
            self.group_sizes.append(None)
            self.errors.append(repr(e))

    def apply(self, learning_rate: float) -> None:
        self.weight -= learning_rate * self.gradients[0]
        self.bias -= learning_rate * self.gradients[1]

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float(((x @ self.weight.T + self.bias).argmax(dim=1) == y).float().mean())


async def run(config: dict[str, Any], stdin: _Stdin) -> None:
    x, y, test, train = digits()
    initial_peer = await stdin.next("initial_peer")
    dht = await DHTNode.launch([PeerAddress.parse(initial_peer)] if initial_peer else [])
    participants: list[Participant] = []
    try:
        participants = [Participant(r, peer, dht, config) for r in config["runs"] for peer in config["peers"]]
        for participant in participants:
            await participant.server.start()
        emit({"event": "up", "address": dht.address})
        t0 = float(await stdin.next("t0"))
        for step in range(int(config["steps"])):
            await asyncio.sleep(max(0.0, t0 + step * float(config["period"]) - time.time()))
            for participant in participants:
                batch = minibatch(train, participant.peer, step)
                participant.compute_gradient(x[batch], y[batch])
            await asyncio.gather(*(participant.average() for participant in participants))
            for participant in participants:
                participant.apply(float(config["learning_rate"]))
        emit({"event": "done", "results": [
            {"run": p.run, "peer": p.peer, "accuracy": p.accuracy(x[test], y[test]), "group_sizes": p.group_sizes,
             "errors": p.errors} for p in participants
        ]})  # fmt: skip
        await stdin.end()
    finally:
        for participant in participants:
            await participant.averager.close()
            await participant.server.stop(0)
        await dht.shutdown()


async def main_async(config: dict[str, Any]) -> None:
    await run(config, _Stdin(asyncio.get_running_loop()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="JSON object: see the module docstring and the test")
    config = json.loads(parser.parse_args(argv).config)
    die_with_parent()
    torch.set_num_threads(1)
    limit = threading.Timer(float(config["max_seconds"]), lambda: os._exit(3))  # never outlive the test
    limit.daemon = True
    limit.start()
    asyncio.run(main_async(config))


if __name__ == "__main__":
    main()

"""Peers of the lying-reducer test, several per process, averaging fresh tensors every round.

    python -m tests.trust_reducer_worker --config '{"peers": [0, 1, 2, 3], ...}'

For every peer index in `peers` this process hosts one participant: its own identity (from the
index), `RpcServer` (gRPC + bulk, real sockets) and `Averager`; the process's participants share
one DHT node. In round r every participant averages `make_tensors(peer, shapes, r)`; round r of
every participant starts at `t0 + r * period`.

Failure injection point `bias_reduced_span` (config `liar`, `bias`, `bias_rounds`): in the
rounds listed, participant `liar` adds `bias` to every value of the span it reduces before
returning it to the senders; everything else it does honestly.

Protocol (JSON lines): stdin `{"initial_peer": ADDRESS | null}`, then (after we print
`{"event": "up", "address"}`) `{"t0": UNIX_TIME}`; once every round is over, results go to
`torch.save(config["output"])` (per peer: `peer_id`, `results` (flattened tensors after each
round), `members` (each round's group, or None), `errors`, `banned` (peer ids this participant
banned, after each round), `audits` (audited spans by outcome)), and we print `{"event": "done"}`.
Then it serves (others may still audit us) until stdin closes.
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
from averaging_worker import _Stdin, identity_from_seed, make_tensors

from worker_support import die_with_parent, emit

from apiary.averaging.allreduce import GroupRound, flatten
from apiary.averaging.averager import Averager, AveragerSettings
from apiary.dht import DHTNode
from apiary.wire import PeerAddress, RpcServer, WireSettings

SEED_BASE = 500  # identities of this test's peers, apart from other tests'


class Participant:
    def __init__(self, peer: int, dht: DHTNode, config: dict[str, Any]):
        self.peer = peer
        self.shapes = config["shapes"]
        self.tensors = make_tensors(peer, self.shapes)
        self.identity = identity_from_seed(SEED_BASE + peer)
        self.server = RpcServer(WireSettings(listen_host="127.0.0.1", shutdown_grace=0.2), self.identity)
        settings = AveragerSettings(
            prefix="lying-reducer", target_group_size=config["group_size"], min_group_size=2,
            expected_peers=config["group_size"], gather_seconds=config["gather_seconds"],
            join_seconds=config["join_seconds"], sender_timeout=3.0, round_timeout=config["period"] * 2,
            codec=config["codec"], verify_reductions=config["verify"], aggregation=config.get("aggregation", "mean"),
            clip_radius=config.get("clip_radius", 1.0),
        )
        self.averager = Averager(self.tensors, dht, self.identity.peer_id, settings)
        self.averager.attach(self.server)
        self.round = 0
        if peer == config["liar"]:
            self._bias_reduced_span(float(config["bias"]), set(config["bias_rounds"]))
        self.results: list[torch.Tensor] = []
        self.members: list[list[str] | None] = []
        self.errors: list[str] = []
        self.banned: list[list[str]] = []

    def _bias_reduced_span(self, bias: float, rounds: set[int]) -> None:
        """Failure injection point `bias_reduced_span`: the span we reduce comes back shifted by
        `bias` in the rounds listed (the parts we keep, and serve to auditors, stay as received)."""
        reductions = self.averager.reductions
        original_open = reductions.open

        def open_biased(round_: GroupRound) -> None:
            original_open(round_)
            if self.round not in rounds:
                return
            reduction = reductions._reductions[round_.group_id]
            honest_finish = reduction.finish

            def biased_finish() -> None:
                if not reduction.done.is_set():
                    honest_finish()
                    assert reduction.mean is not None
                    reduction.mean.add_(bias)

            reduction.finish = biased_finish  # type: ignore[method-assign]

        reductions.open = open_biased  # type: ignore[method-assign]

    async def step(self, round_index: int) -> None:
        self.round = round_index
        with torch.no_grad():
            for tensor, fresh in zip(self.tensors, make_tensors(self.peer, self.shapes, round_index)):
                tensor.copy_(fresh)
        members: list[str] | None = None
        matchmaker = self.averager._matchmaker()
        original = matchmaker.form_group

        async def recording(*args: Any, **kwargs: Any) -> Any:
            nonlocal members
            group = await original(*args, **kwargs)
            members = None if group is None else [m.peer_id for m in group[1]]
            return group

        matchmaker.form_group = recording  # type: ignore[method-assign]
        try:
            size = await self.averager.step()
            if size is None:
                members = None
        except Exception as e:  # noqa: BLE001 - reported to the test
            self.errors.append(f"round {round_index}: {e!r}")
            members = None
        finally:
            matchmaker.form_group = original  # type: ignore[method-assign]
        self.members.append(members)
        self.results.append(flatten(self.tensors).clone())
        verifier = self.averager.verifier
        self.banned.append(sorted(verifier.banned) if verifier is not None else [])

    def summary(self) -> dict[str, Any]:
        verifier = self.averager.verifier
        return {"peer": self.peer, "peer_id": self.identity.peer_id, "results": self.results, "members": self.members,
                "errors": self.errors, "banned": self.banned,
                "audits": dict(verifier.audits) if verifier is not None else {}}


async def run(config: dict[str, Any], stdin: _Stdin) -> None:
    initial_peer = await stdin.next("initial_peer")
    dht = await DHTNode.launch([PeerAddress.parse(initial_peer)] if initial_peer else [])
    participants: list[Participant] = []
    try:
        participants = [Participant(peer, dht, config) for peer in config["peers"]]
        for participant in participants:
            await participant.server.start()
        emit({"event": "up", "address": dht.address})
        t0 = float(await stdin.next("t0"))
        for round_index in range(int(config["rounds"])):
            await asyncio.sleep(max(0.0, t0 + round_index * float(config["period"]) - time.time()))
            await asyncio.gather(*(p.step(round_index) for p in participants))
        torch.save([p.summary() for p in participants], config["output"])
        emit({"event": "done"})
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

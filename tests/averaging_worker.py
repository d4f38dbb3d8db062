"""One participant of an averaging test swarm, in a process of its own.

Started by `tests/averaging_harness.py` (or by hand, from the repository root):

    python -m tests.averaging_worker --config '{"index": 0, "output": "/tmp/p0.pt", ...}'

It runs a DHT node (`DHTNode.launch`: a new swarm, or joining through `initial_peer`), an
`RpcServer` on 127.0.0.1 with an `Averager` attached, and averages tensors made from `seed`
(`make_tensors`, which tests call to recompute them) for `rounds` rounds: round r starts at
wall-clock time `t0 + r * period`, so every peer of the swarm is in the same round.

Protocol (one JSON object per line):
- stdin, unless the config holds them: `{"initial_peer": ADDRESS | null}` first, then, after we
  printed that we are up, `{"t0": UNIX_TIME}`.
- stdout: `{"event": "up", "peer_id", "address", "bulk"}` once the DHT node and the server
  are up; `{"event": "done"}` once the results are written. Then we keep serving (others may
  still need our DHT node or reducer) until stdin closes, SIGTERM, or `max_seconds` pass.

Results (`torch.save` to `output`): `peer_id`, `initial` and `final` (lists of tensors), `history`
(the flattened float32 tensors after each round) and `rounds`, one dict per round: `size` (the
group size `step` returned, None if no group formed), `members` (peer ids of the group), `error`
(repr of what `step` raised, else None), `started`/`seconds` (wall clock), `codec`.

Several averagers in one process (each with its own DHT node, server and port, on one event
loop): `co_hosted`, a list of configs laid over this one; each prints its own `up` and `done`
and writes its results to `output` + `.1`, `.2`, ...

Reproducible groups: `identity_seed` fixes the peer id (the order of peer ids decides groups and
leaders), `grid_coords` the Moshpit grid coordinates to start from, `grid_seed` the random ones.

Fault injection (test code, selected by `faults` in the config):
- `stall_sending: S` and `slow: S`: every outgoing Reduce call sleeps S seconds first (a stall is
  longer than the sender timeout, a slow peer stays within it);
- `stop_reducing: true`: this peer's Reduce route fails every call, so senders keep their local
  values for its span (its own part still goes to its local reduction);
- `bias_reduced_span: {"bias": B, "rounds": [r, ...]}`: in those rounds this peer reduces
  honestly but returns its span shifted by B (the parts it keeps, and serves to auditors, stay
  as received): a lying reducer.

Keyed failures (`apiary.faults`): `fault_plan`, e.g. "averager.round=2:crash", is installed for
the whole process (co-hosted averagers share it; a crash takes them all).

With `verify_reductions`, each round's record also holds `banned` (the peer ids this averager
has banned, after the round) and `audits` (its audited spans so far, by outcome).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from worker_support import die_with_parent, emit

from apiary.averaging.allreduce import REDUCE_ROUTE, AllReduceService, GroupRound
from apiary.averaging.averager import GRADIENTS, STATE, STATE_ROUNDS, Averager, AveragerSettings
from apiary.averaging.compression.selection import codec_selection
from apiary.averaging.flat import flatten
from apiary.dht import DHTNode
from apiary.faults import FaultPlan, install
from apiary.wire import Identity, PeerAddress, RpcServer, WireSettings
from apiary.wire.bulk import BulkCall

DEFAULTS: dict[str, Any] = {
    "prefix": "test",
    "mode": "node",
    "target_group_size": 4,
    "min_group_size": 2,
    "expected_peers": 4,
    "bandwidth": 1e8,
    "codec": "none",  # or a list: round r uses codec[r % len] (in both roles)
    "state_codec": None,
    "state_rounds": [],  # rounds stepped as state rounds (numbered STATE_ROUNDS + r)
    "gather_seconds": 1.0,
    "join_seconds": 1.0,
    "sender_timeout": 3.0,
    "round_timeout": 30.0,
    "seed": 0,
    "shapes": [[64, 8], [37]],
    "fresh_each_round": False,  # remake the tensors from (seed, round) before every round
    "weight": 1.0,
    "rounds": 1,
    "period": 4.0,
    "faults": {},
    "fault_plan": "",  # apiary.faults plan of this process
    "verify_reductions": False,
    "max_seconds": 120.0,
    "plaintext": False,  # the DHT node and the averager's server speak plaintext (the averager's pool: its default)
    "skip_rounds": [],  # rounds this peer sits out; the others name their round to step()
    "rejoin_weight": 1.0,  # factor on the weight of a round that follows missed rounds
}

AVERAGER_FIELDS = ("prefix", "mode", "target_group_size", "min_group_size", "expected_peers", "bandwidth", "verify_reductions",
                   "gather_seconds", "join_seconds", "sender_timeout", "round_timeout", "rejoin_weight")


def make_tensors(seed: int, shapes: list[list[int]], round_index: int = 0) -> list[torch.Tensor]:
    """The tensors a worker with this seed averages (in round `round_index` if remade each round)."""
    generator = torch.Generator().manual_seed(seed * 1000 + round_index)
    return [torch.randn(*shape, generator=generator) for shape in shapes]


def identity_from_seed(seed: int) -> Identity:
    """A reproducible identity (so a test can fix the peer-id order, which decides groups)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Identity(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"averaging-worker-{seed}".encode()).digest()))



class _Stdin:
    """Lines of stdin as an asyncio queue (None at end of file), read by a daemon thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def put(message: dict[str, Any] | None) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, message)
            except RuntimeError:  # the loop is closed: we are exiting
                pass

        def read() -> None:  # raw reads: a daemon thread blocked in a buffered read aborts at exit
            pending = b""
            try:
                while chunk := os.read(sys.stdin.fileno(), 65536):
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        if line.strip():
                            put(json.loads(line))
            except (OSError, ValueError):
                pass
            finally:
                put(None)

        threading.Thread(target=read, daemon=True).start()

    async def next(self, key: str) -> Any:
        message = await self.queue.get()
        if message is None:
            raise SystemExit(f"stdin closed while waiting for {key!r}")
        return message[key]

    async def end(self) -> None:
        """Returns when stdin closes (other lines are ignored)."""
        while await self.queue.get() is not None:
            pass


def _inject_faults(averager: Averager, server: RpcServer, faults: dict[str, Any]) -> None:
    delay = float(faults.get("stall_sending", 0.0)) + float(faults.get("slow", 0.0))
    if delay > 0:
        original = averager.bulk_client.call

        async def delayed_call(endpoint: Any, route: str, **kwargs: Any) -> Any:
            if route == REDUCE_ROUTE:
                await asyncio.sleep(delay)
            return await original(endpoint, route, **kwargs)

        averager.bulk_client.call = delayed_call  # type: ignore[method-assign]
    if faults.get("stop_reducing"):
        assert server.bulk is not None

        async def failing_reduce(call: BulkCall) -> Any:
            raise RuntimeError("fault injection: this peer stopped reducing")

        server.bulk.add_route(REDUCE_ROUTE, failing_reduce)
    if "bias_reduced_span" in faults:
        rounds = set(faults["bias_reduced_span"]["rounds"])  # step() moves round_index past the round it runs
        bias_reduced_span(averager.reductions, float(faults["bias_reduced_span"]["bias"]),
                          lambda: averager.round_index - 1 in rounds)


def bias_reduced_span(reductions: AllReduceService, bias: float, now: Callable[[], bool]) -> None:
    """Failure injection point `bias_reduced_span`: the span these reductions reduce comes back
    shifted by `bias` in the rounds that open while `now()` holds."""
    original_open = reductions.open

    def open_biased(round_: GroupRound) -> None:
        original_open(round_)
        if not now():
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


def _record_groups(averager: Averager, records: list[dict[str, Any]]) -> None:
    """Notes the members of each group this averager forms (for the test to replay the rounds)."""
    matchmaker = averager._matchmaker()
    original = matchmaker.form_group

    async def recording_form_group(group_key: str, *args: Any) -> Any:
        group = await original(group_key, *args)
        records.append({"key": group_key, "members": None if group is None else [m.peer_id for m in group[1]]})
        return group

    matchmaker.form_group = recording_form_group  # type: ignore[method-assign]


async def run(config: dict[str, Any], stdin: _Stdin, stop: asyncio.Event) -> None:
    seed = int(config["seed"])
    random.seed(config.get("grid_seed", None))  # the Moshpit grid's random coordinates
    identity = identity_from_seed(config["identity_seed"]) if "identity_seed" in config else Identity.generate()
    initial_peer = config["initial_peer"] if "initial_peer" in config else await stdin.next("initial_peer")
    tls = not config["plaintext"]
    dht = await DHTNode.launch([PeerAddress.parse(initial_peer)] if initial_peer else [],
                               wire=WireSettings(listen_host="127.0.0.1", bulk=False, tls=tls))
    server: RpcServer | None = None
    averager: Averager | None = None
    try:
        tensors = make_tensors(seed, config["shapes"])
        initial = [t.clone() for t in tensors]
        codecs = config["codec"] if isinstance(config["codec"], list) else [config["codec"]]
        settings = AveragerSettings(**{name: config[name] for name in AVERAGER_FIELDS}, codec=codecs[0],
                                    state_codec=config["state_codec"])
        averager = Averager(tensors, dht, identity.peer_id, settings)
        if "grid_coords" in config:
            averager.grid.coords = list(config["grid_coords"])
            averager.grid.settled = True  # start from exactly these coordinates
        server = RpcServer(WireSettings(listen_host="127.0.0.1", shutdown_grace=0.2, tls=tls), identity)
        averager.attach(server)
        _inject_faults(averager, server, config["faults"])
        await server.start()
        groups: list[dict[str, Any]] = []
        _record_groups(averager, groups)
        emit({"event": "up", "peer_id": identity.peer_id, "address": dht.address, "bulk": str(server.announced_bulk)})

        t0 = float(config["t0"]) if "t0" in config else float(await stdin.next("t0"))
        rounds: list[dict[str, Any]] = []
        history: list[torch.Tensor] = []
        for round_index in range(int(config["rounds"])):
            if round_index in config["skip_rounds"]:
                continue
            await asyncio.sleep(max(0.0, t0 + round_index * float(config["period"]) - time.time()))
            if config["fresh_each_round"]:
                with torch.no_grad():
                    for tensor, fresh in zip(tensors, make_tensors(seed, config["shapes"], round_index)):
                        tensor.copy_(fresh)
            state = round_index in config["state_rounds"]
            if len(codecs) > 1:
                codec = codecs[round_index % len(codecs)]
                averager.codecs = dict.fromkeys([GRADIENTS, STATE], codec_selection(codec))
            else:
                codec = (settings.state_codec or settings.codec) if state else settings.codec
            started = time.time()
            record: dict[str, Any] = {"round": round_index, "codec": codec, "started": started, "size": None,
                                      "error": None, "members": None}
            groups.clear()
            try:
                record["size"] = await averager.step(float(config["weight"]),
                                                     round=STATE_ROUNDS + round_index if state else round_index)
            except Exception as e:  # noqa: BLE001 - reported to the test
                record["error"] = repr(e)
                traceback.print_exc()
            record["seconds"] = time.time() - started
            record["members"] = groups[-1]["members"] if groups else None
            if averager.verifier is not None:
                record["banned"], record["audits"] = sorted(averager.verifier.banned), dict(averager.verifier.audits)
            rounds.append(record)
            history.append(flatten(tensors).clone())
        torch.save({"peer_id": identity.peer_id, "initial": initial, "final": [t.clone() for t in tensors],
                    "history": history, "rounds": rounds}, config["output"])
        emit({"event": "done"})
        # keep serving (others may still call our DHT node or reducer) until told to stop
        eof = asyncio.ensure_future(stdin.end())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({eof, stopped}, return_when=asyncio.FIRST_COMPLETED)
        eof.cancel()
        stopped.cancel()
    finally:
        if averager is not None:
            await averager.close()
        if server is not None:
            await server.stop(0)
        await dht.shutdown()


class _Feed(_Stdin):
    """A copy of stdin's lines for one of several averagers hosted in this process."""

    def __init__(self) -> None:
        self.queue = asyncio.Queue()


async def _fan_out(stdin: _Stdin, feeds: list[_Feed]) -> None:
    while True:
        message = await stdin.queue.get()
        for feed in feeds:
            feed.queue.put_nowait(message)
        if message is None:
            return


async def main_async(config: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    guests = config.pop("co_hosted", [])
    if not guests:
        await run(config, _Stdin(loop), stop)
        return
    # several averagers in this process (each with its own DHT node, server and port)
    configs = [config] + [{**config, **guest, "output": f"{config['output']}.{k}"} for k, guest in enumerate(guests, 1)]
    feeds = [_Feed() for _ in configs]
    forwarding = asyncio.ensure_future(_fan_out(_Stdin(loop), feeds))
    try:
        await asyncio.gather(*(run(c, feed, stop) for c, feed in zip(configs, feeds)))
    finally:
        forwarding.cancel()




def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="JSON object: see DEFAULTS and the module docstring")
    config = {**DEFAULTS, **json.loads(parser.parse_args(argv).config)}
    die_with_parent()
    install(FaultPlan.parse(config["fault_plan"]))
    # a hard limit: a worker never outlives its test, whatever happens to the swarm
    limit = threading.Timer(float(config["max_seconds"]), lambda: os._exit(3))
    limit.daemon = True
    limit.start()
    asyncio.run(main_async(config))


if __name__ == "__main__":
    main()

"""A trainer that uses remote experts, run on a host of a `Network`:

    python -m net.moe_client --dht-local 127.0.0.1:PORT --prefix ffn --grid 3,2 --k-best 6 --k-min 4

It reads the swarm through the participant's dht service (`--dht-local`: a client-mode one
works too, so it runs behind a NAT) or through an embedded client-mode node
(`--initial-peers`), then trains a small regression model whose middle layer is a
`RemoteMixtureOfExperts` for `--steps` steps, and prints one JSON line: per step, its time,
the time of the forward calls to the experts (`dispatch`: the pass without its beam search in
the DHT) and of the backward pass, and how many of the samples' chosen experts answered, per
first grid coordinate; and the held-out loss before and after. With `--wait-all-passes N` it
then times N forward passes that wait for every chosen expert (k_min = k_best), for reference.
With `--tolerate-failures` a step that fails (too few experts answered) is recorded as
`{"failed": error}` and training goes on; `--progress` prints `step <i> done|failed` after
each step and `--step-pause` sleeps between steps (a run long enough to break something in).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from apiary.dht import DHTNode, DHTSettings
from apiary.dht.api import DHTClient
from apiary.dht.interface import DHTLike
from apiary.moe import ExpertChoice, FaultTolerance, RemoteMixtureOfExperts, run_sync
from apiary.moe.client import shared_pool
from apiary.wire import Endpoint, parse_peer_list


class ObservedMixture(RemoteMixtureOfExperts):
    """The layer, remembering which chosen experts answered in its latest pass."""

    answered: dict[int, int]
    chosen: dict[int, int]
    dispatch_seconds: float

    def call_experts(self, x: torch.Tensor, choices: list[list[ExpertChoice]], k: int):  # type: ignore[override]
        started = time.monotonic()
        outputs, alive, coordinates = super().call_experts(x, choices, k)
        self.dispatch_seconds = time.monotonic() - started
        self.chosen, self.answered = {}, {}
        for sample, experts in enumerate(choices):
            for slot, choice in enumerate(experts[:k]):
                row = choice.coordinates[0]
                self.chosen[row] = self.chosen.get(row, 0) + 1
                self.answered[row] = self.answered.get(row, 0) + int(alive[sample, slot])
        return outputs, alive, coordinates


def connect(args: argparse.Namespace) -> DHTLike:
    if args.dht_local:
        endpoint = Endpoint.parse(args.dht_local)

        async def client() -> DHTLike:  # its channels must live on the background loop
            return DHTClient(endpoint, shared_pool(), timeout=10)

        return run_sync(client(), 10)
    return run_sync(DHTNode.launch(parse_peer_list(args.initial_peers), settings=DHTSettings(client_mode=True)), 60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dht-local", default="", help="the participant's dht service, host:port")
    parser.add_argument("--initial-peers", default="", help="else an embedded client-mode DHT node joining these")
    parser.add_argument("--prefix", default="ffn")
    parser.add_argument("--grid", default="3,2", help="the grid's size per dimension")
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--k-best", type=int, default=6)
    parser.add_argument("--k-min", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=2.0, help="forward and backward timeout of a pass")
    parser.add_argument("--after-k-min", type=float, default=0.05, help="timeout_after_k_min")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--wait-all-passes", type=int, default=0)
    parser.add_argument("--tolerate-failures", action="store_true", help="a failed step is recorded, not fatal")
    parser.add_argument("--progress", action="store_true", help="print a line after each step")
    parser.add_argument("--step-pause", type=float, default=0.0, help="seconds to sleep after each step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    dht = connect(args)
    grid = [int(size) for size in args.grid.split(",")]
    tolerance = FaultTolerance(k_min=args.k_min, forward_timeout=args.timeout, backward_timeout=args.timeout,
                               timeout_after_k_min=args.after_k_min)
    moe = ObservedMixture(in_features=args.hidden, grid_size=grid, dht=dht, prefix=args.prefix, k_best=args.k_best,
                          fault_tolerance=tolerance)
    model = nn.Sequential(nn.Linear(8, args.hidden), nn.Tanh(), moe, nn.Linear(args.hidden, 1))
    teacher = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)).requires_grad_(False)
    inputs = torch.randn(args.steps, args.batch, 8)
    held_out = torch.randn(256, 8)

    def held_out_loss() -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(model(held_out), teacher(held_out)).item()

    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_start = held_out_loss()
    steps = []
    for number, x in enumerate(inputs):
        started = time.monotonic()
        optimizer.zero_grad()
        try:
            loss = nn.functional.mse_loss(model(x), teacher(x))
            backward_started = time.monotonic()
            loss.backward()
        except Exception as e:
            if not args.tolerate_failures:
                raise
            steps.append({"failed": repr(e)})
        else:
            ended = time.monotonic()
            steps.append({"seconds": round(ended - started, 4), "dispatch": round(moe.dispatch_seconds, 4),
                          "backward": round(ended - backward_started, 4), "chosen": moe.chosen,
                          "answered": moe.answered})
            optimizer.step()
        if args.progress:
            print(f"step {number} {'failed' if 'failed' in steps[-1] else 'done'}", flush=True)
        time.sleep(args.step_pause)
    report = {"steps": steps, "loss_start": loss_start, "loss_end": held_out_loss()}
    done = [step for step in steps if "failed" not in step]
    for part in ("seconds", "dispatch", "backward"):
        report[f"median_{part}"] = statistics.median(step[part] for step in done) if done else None

    if args.wait_all_passes:
        moe.fault_tolerance = FaultTolerance(k_min=args.k_best, forward_timeout=10 * args.timeout,
                                             timeout_after_k_min=0.0)
        passes = []
        with torch.no_grad():
            for x in inputs[: args.wait_all_passes]:
                model(x)
                passes.append({"dispatch": round(moe.dispatch_seconds, 4), "answered": moe.answered})
        report["wait_all_passes"] = passes
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()

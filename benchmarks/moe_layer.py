"""apiary's mixture-of-experts layer over expert servers: forward + backward samples per second.

Starts an `apiary dht` process and `--servers` `apiary expert-server` processes (TLS, as they
run by default) that host the grid `<prefix>.[0:rows].[0:columns]` of `ffn` experts between
them, one row range each; then times `RemoteMixtureOfExperts` (k_best of the grid, a client-mode
DHT node of this process finding them) on a [batch, hidden] input: forward, backward, median of
`--steps` after `--warmup`. The servers train their experts on every backward, as in training.

    .venv/bin/python benchmarks/moe_layer.py [--hidden 64] [--grid 4x4] [--k 2] [--batch 512]

benchmarks/hivemind_reference.py runs it (with --json: one line of figures, no results file) to
put hivemind's RemoteMixtureOfExperts on the same layer beside it, and benchmarks/flagship.py
starts its expert servers the same way (`LocalSwarm.start_expert_servers`, as `apiary up`).
apiary is imported inside the functions that use it, so that hivemind_reference.py can share
the flags and helpers from hivemind's environment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from record import save


def row_ranges(rows: int, servers: int) -> list[tuple[int, int]]:
    """The grid's rows split into `servers` contiguous ranges, as even as they can be."""
    if not 1 <= servers <= rows:
        raise ValueError(f"{servers} servers cannot share {rows} grid rows (1 to {rows} servers)")
    bounds = [round(i * rows / servers) for i in range(servers + 1)]
    return list(zip(bounds, bounds[1:]))


def parse_grid(text: str) -> tuple[int, int]:
    """'4x4' -> (4, 4)."""
    try:
        rows, columns = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must be ROWSxCOLUMNS, e.g. 4x4, got {text!r}") from None
    if rows < 1 or columns < 1:
        raise argparse.ArgumentTypeError(f"grid sizes must be positive, got {text!r}")
    return rows, columns


def timed_steps(step: Any, steps: int, warmup: int, batch: int) -> float:
    """Median samples per second of `step()` over `steps` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        rates.append(batch / (time.perf_counter() - started))
    return statistics.median(rates)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from apiary.cli.up import LocalSwarm
    from apiary.dht import DHTNode, DHTSettings
    from apiary.moe import FaultTolerance, RemoteMixtureOfExperts, run_sync
    from apiary.wire import parse_peer_list

    rows, columns = args.grid
    with tempfile.TemporaryDirectory(prefix="apiary-moe-layer-") as folder:
        experts = LocalSwarm(Path(folder), 1, [])  # its dht service and expert servers, no trainers
        try:
            experts.start_expert_servers(
                [["--experts", f"{args.prefix}.[{low}:{high}].[0:{columns}]", "--hidden-size", str(args.hidden)]
                 for low, high in row_ranges(rows, args.servers)])
            dht = run_sync(DHTNode.launch(parse_peer_list(experts.first_peers), settings=DHTSettings(client_mode=True)),
                           30)
            torch.manual_seed(0)
            layer = RemoteMixtureOfExperts(in_features=args.hidden, grid_size=(rows, columns), dht=dht,
                                           prefix=args.prefix, k_best=args.k,
                                           fault_tolerance=FaultTolerance(k_min=1, forward_timeout=args.timeout,
                                                                          backward_timeout=args.timeout))
            generator = torch.Generator().manual_seed(1)
            x = torch.randn(args.batch, args.hidden, generator=generator)
            grad = torch.randn(args.batch, args.hidden, generator=generator)

            def step() -> None:
                layer(x.clone().requires_grad_(True)).backward(grad)

            samples_per_second = timed_steps(step, args.steps, args.warmup, args.batch)
            run_sync(dht.shutdown(), 30)
        finally:
            experts.stop()
    return {"hidden": args.hidden, "grid": [rows, columns], "k": args.k, "batch": args.batch, "servers": args.servers,
            "steps": args.steps, "samples_per_second": samples_per_second}


def arguments(parser: argparse.ArgumentParser) -> None:
    """The layer's flags, shared with benchmarks/hivemind_reference.py's moe part."""
    parser.add_argument("--hidden", type=int, default=64, help="the experts' hidden size (moe_lm tiny's width)")
    parser.add_argument("--grid", type=parse_grid, default=(4, 4), help="ROWSxCOLUMNS experts")
    parser.add_argument("--k", type=int, default=2, help="experts mixed per sample (k_best, moe_lm tiny's)")
    parser.add_argument("--batch", type=int, default=512, help="samples (tokens) per pass")
    parser.add_argument("--servers", type=int, default=3, help="expert servers sharing the grid's rows")
    parser.add_argument("--steps", type=int, default=20, help="timed forward + backward passes")
    parser.add_argument("--warmup", type=int, default=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments(parser)
    parser.add_argument("--prefix", default="lm", help="the grid's name")
    parser.add_argument("--timeout", type=float, default=30.0, help="forward and backward timeouts, seconds")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line, save nothing")
    args = parser.parse_args()
    figures = measure(args)
    if args.json:
        print(json.dumps(figures), flush=True)
        return
    print(f"apiary RemoteMixtureOfExperts, {figures['servers']} servers: {figures['samples_per_second']:.0f} samples/s")
    save("moe_layer", figures)


if __name__ == "__main__":
    main()

"""Peak memory and step time of the collaborative optimizer against a plain torch loop.

Trains a stack of Linear layers (`--params`, default ≥ 100 M parameters) with Adam for a few
steps in a fresh subprocess per variant — the plain torch loop, `apiary.Optimizer` by default
(a separate accumulator), with `reuse_grad_buffers`, and with `reuse_grad_buffers` plus
`offload_optimizer` — and reports each one's peak RSS (and peak CUDA memory when the model is on
a GPU) and median step time, and their ratios to the plain loop. The optimizer runs against a
lone in-memory swarm in client mode (an epoch per step, as the plain loop steps per batch;
no round and no state copy for newcomers, which a serving peer's averager also keeps): what is
measured is the optimizer's own buffers. On CPU `offload_optimizer` has nothing to move (the
parameters are already there).

    .venv/bin/python benchmarks/memory.py                    # device auto: cuda if present
    .venv/bin/python benchmarks/memory.py --device cuda --steps 10
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from record import save

VARIANTS: dict[str, dict[str, bool] | None] = {
    "plain torch loop": None,
    "apiary default": {},
    "reused buffers": {"reuse_grad_buffers": True},
    "reused buffers + offloaded optimizer": {"reuse_grad_buffers": True, "offload_optimizer": True},
}


class LoneSwarm:
    """The `Swarm` (optim/swarm.py) of a peer alone in its run, in client mode, kept in memory."""

    peer_id, client_mode, dht_address, averaged_bytes = "alone", True, None, 0
    last_outcome, matchmaking_seconds = None, 0.0

    async def publish_progress(self, epoch: int, samples: int, samples_per_second: float) -> bool:
        return True

    async def fetch_progress(self) -> Any:
        from apiary.optim import SwarmProgress
        return SwarmProgress(0, 0.0, 0.0, 0.0, 1, time.monotonic())

    async def register(self, tensors: Any) -> None:
        pass

    async def prepare(self, tensors: Any, round_index: int) -> bool:
        return False

    async def average(self, tensors: Any, weight: float, round_index: int) -> int | None:
        return None

    async def publish_state(self, metadata: Any, tensors: Any) -> None:
        pass

    async def load_state(self, timeout: float) -> None:
        return None

    async def close(self) -> None:
        pass


def model_of(params: int, width: int) -> torch.nn.Sequential:
    layers = max(1, round(params / (width * width + width)))
    return torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))


def measure(variant: str, params: int, width: int, batch: int, steps: int, device: str) -> dict[str, Any]:
    """One variant's figures, in this (fresh) process."""
    from apiary.optim import Optimizer

    torch.manual_seed(0)
    model = model_of(params, width).to(device)
    options = VARIANTS[variant]
    def adam(params: Any) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=1e-4)

    if options is None:
        optimizer, opt = adam(model.parameters()), None
    else:
        opt = Optimizer("memory", model.parameters(), adam, target_batch_size=batch, swarm=LoneSwarm(),
                        load_state=False, average_state_every=0, **options)
    x = torch.randn(batch, width, device=device)
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        model(x).square().mean().backward()
        if opt is None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            assert opt.step(batch), "the epoch did not end at its step"
            if not options.get("reuse_grad_buffers"):
                opt.zero_grad()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    if opt is not None:
        opt.close()
    return {"params": sum(p.numel() for p in model.parameters()),
            "model_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
            "step_seconds": statistics.median(seconds[1:] or seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=100_000_000, help="at least this many parameters")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # the subprocess's
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.params, args.width, args.batch, args.steps, args.device)))
        return
    variants = {}
    for variant in VARIANTS:
        command = [sys.executable, str(Path(__file__)), "--variant", variant, "--params", str(args.params),
                   "--width", str(args.width), "--batch", str(args.batch), "--steps", str(args.steps),
                   "--device", args.device]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        variants[variant] = json.loads(out.strip().splitlines()[-1])
        print(variant, variants[variant], flush=True)
    plain = variants["plain torch loop"]
    for figures in variants.values():
        figures["rss_ratio"] = figures["peak_rss_mb"] / plain["peak_rss_mb"]
        if figures["peak_cuda_mb"] is not None:
            figures["cuda_ratio"] = figures["peak_cuda_mb"] / plain["peak_cuda_mb"]
        figures["speed_ratio"] = plain["step_seconds"] / figures["step_seconds"]
    save("memory", {"device": args.device, "batch": args.batch, "steps": args.steps, "variants": variants},
         preset=None if args.device == "cpu" else args.device.split(":")[0])


if __name__ == "__main__":
    main()

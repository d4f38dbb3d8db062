"""Collaborative training on this machine: time and bytes exchanged per epoch, by mode.

Runs `--peers` trainer processes (each with embedded dht and averager services, on loopback)
on the language-model task for each mode — synchronous gradient averaging, delayed updates
(averaging overlapped with the next batches) and DiLoCo — for the same number of samples,
and prints per mode: seconds per epoch, MB exchanged per epoch (all peers), how long training
waited for the round at an epoch's end (mean over peers and epochs) and the share of rounds
whose group was formed ahead of the end, the swarm's samples per second, the final held-out
loss, and the ratio of the swarm's samples per second
to the reference measured in the same run: the same model trained by one plain torch loop on
this machine (no apiary), which is what the peers' compute could do without collaborating.

    .venv/bin/python benchmarks/training.py --peers 4 --epochs 8 --steps 32
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from apiary.cli.up import LocalSwarm
from apiary.tasks import load_task
from record import save

TASK_OPTIONS = {"width": 64, "layers": 2, "heads": 4, "context": 64, "batch_size": 16, "eval_batches": 4}
ROUNDS = {"gather_seconds": 0.5, "join_seconds": 1.5, "sender_timeout": 10.0}


def local_reference(steps: int) -> float:
    """Samples per second of a plain torch loop on the same task (all of this machine's threads)."""
    task = load_task("charlm", seed=0, **TASK_OPTIONS)
    optimizer = task.optimizer(task.model.parameters())
    for _ in range(3):  # warm-up
        task.loss(task.model, next(task.batches)).backward()
    started = time.perf_counter()
    for _ in range(steps):
        task.loss(task.model, next(task.batches)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return steps * task.batch_size / (time.perf_counter() - started)


def run_mode(peers: int, epochs: int, samples_per_epoch: int, extra: list[str], h: int) -> dict[str, float]:
    """One swarm; DiLoCo runs `epochs / h` outer rounds of `h` times the samples."""
    with tempfile.TemporaryDirectory(prefix="apiary-bench-") as folder:
        swarm = LocalSwarm(Path(folder), peers, [
            "--task", "charlm", "--task-options", json.dumps(TASK_OPTIONS), "--averaging", json.dumps(ROUNDS),
            "--target-batch-size", str(samples_per_epoch * h), "--max-epochs", str(epochs // h),
            "--average-state-every", "0", *extra,
        ])
        try:
            swarm.start(peers, clients=0)
            started = time.perf_counter()
            swarm.wait()
            seconds = time.perf_counter() - started
        finally:
            swarm.stop()
        summaries = swarm.summaries()
    if len(summaries) != peers:
        raise RuntimeError(f"{peers - len(summaries)} trainers failed")
    samples = sum(s["samples"] for s in summaries)
    rounds = [record for s in summaries for record in s["history"] if "round_seconds" in record]  # none if delayed
    return {
        "round_wait": sum(r["round_seconds"] for r in rounds) / len(rounds) if rounds else float("nan"),
        "formed_early": sum(r["formed_early"] for r in rounds) / len(rounds) if rounds else float("nan"),
        "seconds_per_epoch": seconds / epochs,
        "mb_per_epoch": sum(s["averaged_bytes"] for s in summaries) / epochs / 1e6,
        "samples_per_second": samples / seconds,
        "loss_end": min(s["loss_end"] for s in summaries),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the synchronous modes (a multiple of --h)")
    parser.add_argument("--h", type=int, default=4, help="DiLoCo: epochs' worth of samples per outer round")
    parser.add_argument("--steps", type=int, default=32, help="batches per peer per epoch (sets the epoch's samples)")
    args = parser.parse_args()
    samples_per_epoch = args.peers * TASK_OPTIONS["batch_size"] * args.steps
    reference = local_reference(steps=50)
    print(f"reference: one plain torch loop on this machine: {reference:.0f} samples/s")
    modes = {
        "synchronous": ([], 1),
        "delayed updates": (["--delay-updates"], 1),
        f"diloco (H={args.h})": (["--mode", "diloco"], args.h),
    }
    print(f"{args.peers} peers, {samples_per_epoch} samples per epoch, {args.epochs} epochs' worth of samples each")
    print(f"{'mode':<18} {'s/epoch':>8} {'MB/epoch':>9} {'wait s':>7} {'early':>6} {'samples/s':>10} {'ratio':>6} "
          f"{'loss':>6}")
    results = {}
    for name, (extra, h) in modes.items():
        result = results[name] = run_mode(args.peers, args.epochs, samples_per_epoch, extra, h)
        ratio = result["samples_per_second"] / reference
        print(f"{name:<18} {result['seconds_per_epoch']:8.2f} {result['mb_per_epoch']:9.2f} "
              f"{result['round_wait']:7.2f} {result['formed_early']:6.2f} "
              f"{result['samples_per_second']:10.0f} {ratio:6.2f} {result['loss_end']:6.3f}", flush=True)
    save("training", {"peers": args.peers, "epochs": args.epochs, "h": args.h, "steps": args.steps,
                      "samples_per_epoch": samples_per_epoch, "reference_samples_per_second": reference,
                      "modes": results})


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()

"""The flagship evidence: the moe_lm task across participants, against local references, then under faults.

In one run, on this machine:
1. swarm  - an `apiary dht` process, `--servers` `apiary expert-server` processes sharing the
            preset's expert grids (one row range of every MoE layer each; started as `apiary up`
            starts them: learning rate 0.003, the tiny trunk's) and `--peers` `apiary trainer` processes (`apiary up`'s local swarm,
            synchronous gradient averaging) training moe_lm with remote experts. Every trainer
            logs each step's forward + backward duration (from the loss's call to the embedding's
            gradient) and evaluates the held-out loss after `--steps` steps of its own
            (`timed_task` below wraps the task inside the trainers).
2. faults - once every trainer has evaluated, one expert server is SIGKILLed and one paused
            (SIGSTOP); the trainers go on for `--fault-steps` more steps each. Reported: the
            held-out loss at the end against the one before the faults, the longest step after
            them against the MoE timeouts (forward + backward) plus a second.
3. local  - the same model with its experts in this process (experts="local"), trained by this
            process alone on the samples the swarm trained before the faults (the same
            effective batch: gradients accumulated over `--target-batch-size` samples per step):
            held-out loss ratio swarm / local (target: within 5%) and tokens/s ratio.
4. dense  - the model with a dense feed-forward block of the same compute per token instead of
            each mixture (experts="dense"), trained the same way: does the MoE model reach a
            lower held-out loss for the same samples?

    .venv/bin/python benchmarks/flagship.py --quick     # a few minutes on 2 cores
    .venv/bin/python benchmarks/flagship.py             # longer: more steps, larger epochs

Results: benchmarks/results/flagship.json (flagship-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
QUICK = {"steps": 12, "fault_steps": 8, "target_batch_size": 64}
FULL = {"steps": 60, "fault_steps": 30, "target_batch_size": 128}


# ---------------------------------------------------------------------------------------------
# inside the trainers: the task, timed


def timed_task(log_folder: str, eval_every: int, **options: Any) -> Any:
    """moe_lm's task (`options`), whose every step appends {"start", "end", "loss"} (forward +
    backward, wall-clock seconds) and every `eval_every` steps {"step", "eval", "time"} to
    <log_folder>/trainer-<seed>.jsonl."""
    import torch

    from apiary.tasks import Task
    from apiary.tasks.moe_lm import task

    inner = task(**options)
    log = open(Path(log_folder) / f"trainer-{options.get('seed', 0)}.jsonl", "a", buffering=1)  # noqa: SIM115 - the trainer's lifetime
    step: dict[str, float] = {}

    def write(record: dict[str, Any]) -> None:
        log.write(json.dumps(record) + "\n")

    def after_backward(_: torch.Tensor) -> None:
        write({**step, "end": time.time()})

    inner.model.embedding.weight.register_post_accumulate_grad_hook(after_backward)  # the last gradient of a backward

    def loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        step["start"] = time.time()
        value = inner.loss(model, batch)
        step["loss"] = value.item()
        return value

    def batches() -> Any:
        for number, batch in enumerate(inner.batches):
            if number and number % eval_every == 0:
                inner.model.eval()
                held_out = inner.evaluate(inner.model)  # type: ignore[misc]  # moe_lm has one
                inner.model.train()
                write({"step": number, "eval": held_out, "time": time.time()})
            yield batch

    return Task(model=inner.model, batches=batches(), loss=loss, optimizer=inner.optimizer,
                batch_size=inner.batch_size, evaluate=inner.evaluate)


# ---------------------------------------------------------------------------------------------
# reading the trainers' logs


def read_logs(folder: Path) -> list[list[dict[str, Any]]]:
    """Every trainer's records, in order (complete lines only: a trainer may be writing one)."""
    return [[json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]
            for path in sorted(folder.glob("trainer-*.jsonl"))]


def evaluations(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "eval" in r]


def steps_between(records: list[dict[str, Any]], begin: float, end: float) -> list[dict[str, Any]]:
    """The steps that started at or after `begin` and ended before `end`."""
    return [r for r in records if "end" in r and r["start"] >= begin and r["end"] <= end]


def durations(steps: list[dict[str, Any]]) -> list[float]:
    return [r["end"] - r["start"] for r in steps]


def tokens_per_second(sequences: int, context: int, seconds: float) -> float:
    return sequences * context / seconds


# ---------------------------------------------------------------------------------------------
# the swarm


def server_flags(preset: str, servers: int) -> list[list[str]]:
    """Each expert server's flags: one row range of every MoE layer's grid."""
    from apiary.tasks.moe_lm import PRESETS, moe_layers
    from moe_layer import row_ranges

    p = PRESETS[preset]
    rows, *rest = p.grid
    others = "".join(f".[0:{size}]" for size in rest)
    return [["--experts", ",".join(f"lm{layer}.[{low}:{high}]{others}" for layer in moe_layers(p)),
             "--hidden-size", str(p.width), "--kind", "ffn", "--max-batch-size", "8192"]
            for low, high in row_ranges(rows, servers)]


def wait_until(condition: Any, timeout: float, what: str) -> None:
    """Polls `condition()` until true; RuntimeError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.5)


def run_swarm(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Phases 1 and 2: the swarm's figures."""
    from apiary.cli.up import LocalSwarm
    from apiary.tasks.moe_lm import PRESETS

    p = PRESETS[args.preset]
    logs = folder / "steps"
    logs.mkdir()
    epochs = math.ceil((args.steps + args.fault_steps) * args.peers * p.batch_size / args.target_batch_size)
    options = {"log_folder": str(logs), "eval_every": args.steps, "preset": args.preset, "shards": args.peers,
               "timeout": args.timeout}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    trainers = LocalSwarm(folder, args.peers, [
        "--task", "flagship:timed_task", "--target-batch-size", str(args.target_batch_size),
        "--max-epochs", str(epochs), "--max-seconds", str(args.max_seconds), "--evaluate-every", "1e9",
        "--average-state-every", "0"])
    try:
        trainers.start_expert_servers(server_flags(args.preset, args.servers))
        options["initial_peers"] = trainers.first_peers  # the experts' dht service, which the trainers join
        trainers.common += ["--task-options", json.dumps(options)]  # after, and so instead of, up's own
        print(f"{args.servers} expert servers up; starting {args.peers} trainers", flush=True)
        trainers.start(args.peers, clients=0)
        wait_until(lambda: len(read_logs(logs)) == args.peers and all(evaluations(r) for r in read_logs(logs)),
                   args.max_seconds, "every trainer's evaluation before the faults")
        fault_time = time.time()
        killed, paused = trainers.infrastructure[1], trainers.infrastructure[2]  # after the dht
        killed.send_signal(signal.SIGKILL)
        paused.send_signal(signal.SIGSTOP)
        print(f"faults: expert server {killed.pid} killed, {paused.pid} paused", flush=True)
        trainers.wait()
        paused.send_signal(signal.SIGCONT)
    finally:
        trainers.stop()
    summaries = trainers.summaries()
    if len(summaries) != args.peers or any("loss_end" not in s for s in summaries):
        tails = "\n".join((folder / f"{i}.log").read_text(errors="replace")[-1500:] for i in range(args.peers))
        raise RuntimeError(f"a trainer did not finish; the ends of their logs:\n{tails}")
    records = read_logs(logs)
    first = [evaluations(r)[0] for r in records]
    phase1_steps = [steps_between(r, 0, e["time"]) for r, e in zip(records, first)]
    began = min(s[0]["start"] for s in phase1_steps)
    ended = max(s[-1]["end"] for s in phase1_steps)
    sequences = sum(len(s) for s in phase1_steps) * p.batch_size
    after = [steps_between(r, fault_time, math.inf) for r in records]
    return {
        "sequences_before_faults": sequences,
        "loss_before_faults": statistics.mean(e["eval"] for e in first),
        "tokens_per_second": tokens_per_second(sequences, p.context, ended - began),
        "step_seconds_median": statistics.median(d for s in phase1_steps for d in durations(s)),
        "loss_end": statistics.mean(s["loss_end"] for s in summaries),
        "steps_after_faults": sum(len(s) for s in after),
        "step_seconds_max_after_faults": max((d for s in after for d in durations(s)), default=float("nan")),
        "step_seconds_median_after_faults": statistics.median([d for s in after for d in durations(s)] or [math.nan]),
        "epochs": max(s["epoch_end"] for s in summaries),
    }


# ---------------------------------------------------------------------------------------------
# the references, in this process


def train_locally(preset: str, experts: str, sequences: int, target_batch_size: int) -> dict[str, float]:
    """One process trains the model (`experts`: local or dense) on `sequences` sequences,
    one optimizer step per `target_batch_size`; its held-out loss and tokens/s."""
    from apiary.tasks.moe_lm import PRESETS, task

    p = PRESETS[preset]
    t = task(preset, experts=experts)
    optimizer = t.optimizer(t.model.parameters())
    accumulate = max(1, target_batch_size // t.batch_size)
    micro_batches = max(1, sequences // t.batch_size)
    started = time.perf_counter()
    for number in range(1, micro_batches + 1):
        (t.loss(t.model, next(t.batches)) / accumulate).backward()
        if number % accumulate == 0 or number == micro_batches:
            optimizer.step()
            optimizer.zero_grad()
    seconds = time.perf_counter() - started
    t.model.eval()
    return {"loss": t.evaluate(t.model),  # type: ignore[misc]  # moe_lm has one
            "tokens_per_second": tokens_per_second(micro_batches * t.batch_size, p.context, seconds)}


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"a few minutes: {QUICK}")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--peers", type=int, default=4, help="trainer processes")
    parser.add_argument("--servers", type=int, default=3, help="expert-server processes (at least 2: faults)")
    parser.add_argument("--steps", type=int, help=f"each trainer's steps before the faults (default {FULL['steps']})")
    parser.add_argument("--fault-steps", type=int, help="each trainer's steps after them (about)")
    parser.add_argument("--target-batch-size", type=int, help="sequences per optimizer step (the swarm's epoch)")
    parser.add_argument("--timeout", type=float, default=5.0, help="the MoE layers' forward and backward timeouts")
    parser.add_argument("--max-seconds", type=float, default=1800, help="a bound on the swarm's training")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the local references (the trainers: 1)")
    args = parser.parse_args()
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.servers < 2:
        parser.error("--servers must be at least 2 (one is killed, one paused)")
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="apiary-flagship-") as folder:
        swarm = run_swarm(args, Path(folder))
    print(f"swarm: {swarm}", flush=True)
    local = train_locally(args.preset, "local", swarm["sequences_before_faults"], args.target_batch_size)
    print(f"local experts: {local}", flush=True)
    dense = train_locally(args.preset, "dense", swarm["sequences_before_faults"], args.target_batch_size)
    print(f"dense: {dense}", flush=True)
    figures = {"preset": args.preset, "peers": args.peers, "servers": args.servers, "steps": args.steps,
               "fault_steps": args.fault_steps, "target_batch_size": args.target_batch_size, "timeout": args.timeout,
               "swarm": swarm, "local": local, "dense": dense}
    print(summary(figures), flush=True)
    from record import save

    save("flagship", figures, preset="quick" if args.quick else None)


def summary(f: dict[str, Any]) -> str:
    """The figures' verdicts, one line each."""
    swarm, local, dense = f["swarm"], f["local"], f["dense"]
    ratio = swarm["loss_before_faults"] / local["loss"]
    bound = 2 * f["timeout"] + 1
    return "\n".join([
        f"held-out loss, swarm / local experts, {swarm['sequences_before_faults']} sequences: "
        f"{swarm['loss_before_faults']:.3f} / {local['loss']:.3f} = {ratio:.3f} "
        f"({'within' if abs(ratio - 1) <= 0.05 else 'NOT within'} 5%)",
        f"tokens/s, swarm / local: {swarm['tokens_per_second']:.0f} / {local['tokens_per_second']:.0f} = "
        f"{swarm['tokens_per_second'] / local['tokens_per_second']:.2f}",
        f"after the faults: {swarm['steps_after_faults']} steps, loss {swarm['loss_before_faults']:.3f} -> "
        f"{swarm['loss_end']:.3f} ({'falls' if swarm['loss_end'] < swarm['loss_before_faults'] else 'does NOT fall'}), "
        f"longest step {swarm['step_seconds_max_after_faults']:.2f} s (bound {bound:.0f} s: "
        f"{'met' if swarm['step_seconds_max_after_faults'] <= bound else 'NOT met'})",
        f"dense reference, same samples: {dense['loss']:.3f}; MoE {'lower' if local['loss'] < dense['loss'] else 'NOT lower'}"
        f" (local experts {local['loss']:.3f}, swarm {swarm['loss_before_faults']:.3f})",
    ])


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()

"""Runs every fuzz target of `fuzz/targets.py` for a while and reports executions and findings.

    .venv/bin/python benchmarks/fuzz.py [--seconds 60] [--targets rpc_request,bulk_frame] [--engine auto]

Each target runs in its own process (`fuzz/run.py`): coverage-guided with atheris where it is
installed, else hypothesis-generated inputs (`--engine hypothesis` forces that). The reference,
measured in the same run, is the `noop` target (the engine alone, for a tenth of the time): each
target's executions per second are printed with their ratio to it. Exits non-zero if any target
found a crash, a broken invariant or a hang (libFuzzer `-timeout`, hypothesis deadline).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from record import save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "fuzz", "run.py")
TARGETS = ["rpc_request", "tensor_message", "chunk_stream", "bulk_frame", "codec_part"]
HANG_SECONDS = 10


def has_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def run_target(name: str, seconds: float, engine: str, workdir: str) -> dict[str, object]:
    """Runs one target; returns its executions, seconds, findings and the output's tail."""
    command = [sys.executable, RUNNER, name, f"-max_total_time={seconds:g}", f"-timeout={HANG_SECONDS}",
               "-rss_limit_mb=4096", "-print_final_stats=1"]
    if engine == "hypothesis":
        command.append("--hypothesis")
    started = time.monotonic()
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=seconds * 3 + 120)
    elapsed = time.monotonic() - started
    output = done.stdout + done.stderr
    summary = next((json.loads(line) for line in reversed(done.stdout.splitlines()) if line.startswith("{")), None)
    if summary is not None:  # the hypothesis fallback
        executions, findings = int(summary["executions"]), int(summary["findings"])
    else:  # libFuzzer: "Done N runs in T second(s)"; a finding leaves crash-/timeout-/oom- files and a non-zero status
        match = re.search(r"Done (\d+) runs in", output)
        executions = int(match.group(1)) if match else 0
        findings = len([f for f in os.listdir(workdir) if re.match(r"(crash|timeout|oom|leak)-", f)])
        if done.returncode != 0 and not findings:
            findings = 1
    return {"target": name, "executions": executions, "seconds": elapsed, "findings": findings,
            "exit": done.returncode, "tail": output[-3000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="fuzzing time per target")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated targets")
    parser.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    args = parser.parse_args()
    engine = args.engine if args.engine != "auto" else ("atheris" if has_atheris() else "hypothesis")
    if engine == "atheris" and not has_atheris():
        raise SystemExit("atheris is not installed: pip install atheris, or use --engine hypothesis")
    print(f"engine: {engine}; {args.seconds:g} s per target; a hang is an input taking over {HANG_SECONDS} s")
    results = []
    with tempfile.TemporaryDirectory(prefix="apiary-fuzz-") as workdir:
        reference = run_target("noop", max(2.0, args.seconds / 10), engine, workdir)
        reference_rate = reference["executions"] / reference["seconds"]
        print(f"{'target':<16}{'executions':>12}{'exec/s':>10}{'ratio to noop':>15}{'findings':>10}")
        print(f"{'noop (reference)':<16}{reference['executions']:>12}{reference_rate:>10.0f}{1.0:>15.3f}{0:>10}")
        for name in [t.strip() for t in args.targets.split(",") if t.strip()]:
            result = run_target(name, args.seconds, engine, workdir)
            rate = result["executions"] / result["seconds"]
            print(f"{name:<16}{result['executions']:>12}{rate:>10.0f}{rate / reference_rate:>15.3f}"
                  f"{result['findings']:>10}", flush=True)
            if result["findings"]:
                print(result["tail"], file=sys.stderr)
            results.append(result)
    save("fuzz", {"engine": engine, "seconds": args.seconds,
                  "targets": {r["target"]: {key: r[key] for key in ("executions", "seconds", "findings", "exit")}
                              for r in [reference, *results]}})
    sys.exit(1 if any(r["findings"] for r in results) else 0)


if __name__ == "__main__":
    main()

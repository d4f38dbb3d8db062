"""Where a benchmark's figures go: one JSON file per benchmark (and preset) under
benchmarks/results/, with the commit, the machine, the command line and the time, so that
docs/benchmarks.md's tables are generated from them (benchmarks/report.py). Standard library
only, so that the hivemind reference benchmark can use it from its own virtual environment."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def results_path(benchmark: str, preset: str | None = None) -> Path:
    """benchmarks/results/<benchmark>.json, or <benchmark>-<preset>.json."""
    return RESULTS / (f"{benchmark}-{preset}.json" if preset else f"{benchmark}.json")


def commit() -> dict[str, Any]:
    """HEAD's hash, and whether tracked files other than the results differed from it (an edit
    in the checkout: the code measured was not HEAD's)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"hash": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                                             f":!{RESULTS.relative_to(ROOT)}"))}
    except (OSError, subprocess.CalledProcessError):
        return {"hash": None, "dirty": None}


def _first(path: str, key: str) -> str | None:
    """The value of the first `key: value` line of a /proc file, if any."""
    try:
        with open(path) as lines:
            return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == key), None)
    except OSError:
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, Python and torch versions, GPUs (nvidia-smi), load average."""
    memory = _first("/proc/meminfo", "MemTotal")
    gpus = None
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True)
        gpus = [line.strip() for line in query.stdout.splitlines() if line.strip()] or None
    return {
        "cpu": _first("/proc/cpuinfo", "model name") or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory.split()[0]) / 2**20, 1) if memory else None,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "gpus": gpus,
        "load_average": [round(load, 2) for load in os.getloadavg()],
    }


def save(benchmark: str, figures: dict[str, Any], preset: str | None = None) -> Path:
    """Writes `figures` with where and how they were measured; returns the file's path."""
    path = results_path(benchmark, preset)
    path.parent.mkdir(parents=True, exist_ok=True)
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    document = {
        "benchmark": benchmark,
        "preset": preset,
        "command": [str(shown), *sys.argv[1:]],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": commit(),
        "machine": machine(),
        "figures": figures,
    }
    path.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    print(f"results written to {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)
    return path


def load(benchmark: str, preset: str | None = None, folder: Path = RESULTS) -> dict[str, Any] | None:
    """The saved results of a benchmark (from `folder`), or None if it has none."""
    path = folder / results_path(benchmark, preset).name
    return json.loads(path.read_text()) if path.exists() else None

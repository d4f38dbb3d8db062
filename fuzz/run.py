"""Runs one fuzz target of `fuzz/targets.py`.

    python fuzz/run.py TARGET [libFuzzer flags, e.g. -max_total_time=60 -timeout=10]

With atheris installed, this is a coverage-guided libFuzzer run (apiary's modules instrumented)
from the target's seed inputs (`targets.seeds`, written to a corpus directory under the system's
temporary directory); libFuzzer prints its progress and `Done N runs in T second(s)`, and a
finding is written as `crash-*` / `timeout-*` in the working directory and ends the run with a
non-zero status. Without atheris (or with `--hypothesis`), hypothesis generates byte strings,
seeds first, for `-max_total_time` seconds (default 60); a finding ends the run with the failing
input printed, and the last line is a JSON summary: {"target", "executions", "seconds", "findings"}.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    import atheris
except ImportError:
    atheris = None


def _flag(argv: list[str], name: str, default: float) -> float:
    for arg in argv:
        if arg.startswith(f"-{name}="):
            return float(arg.split("=", 1)[1])
    return default


def _summary(target: str, executions: int, started: float, findings: int) -> None:
    print(json.dumps({"target": target, "executions": executions, "seconds": round(time.monotonic() - started, 1),
                      "findings": findings}), flush=True)


def run_atheris(name: str, argv: list[str]) -> None:
    with atheris.instrument_imports(include=["apiary"]):
        from targets import TARGETS, seeds
    corpus = os.path.join(tempfile.gettempdir(), f"apiary-fuzz-{name}")
    os.makedirs(corpus, exist_ok=True)
    for index, data in enumerate(seeds()[name]):
        with open(os.path.join(corpus, f"seed-{index}"), "wb") as file:
            file.write(data)
    atheris.Setup([sys.argv[0], *argv, corpus], TARGETS[name])
    atheris.Fuzz()


def run_hypothesis(name: str, argv: list[str]) -> int:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from targets import TARGETS, seeds

    target = TARGETS[name]
    seconds = _flag(argv, "max_total_time", 60.0)
    executions = 0

    @settings(max_examples=2000, deadline=_flag(argv, "timeout", 10.0) * 1000, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=4096), st.sampled_from(seeds()[name])))
    def fuzz(data: bytes) -> None:
        nonlocal executions
        executions += 1
        target(data)

    started = time.monotonic()
    try:
        while time.monotonic() - started < seconds:
            fuzz()
    except Exception as e:  # noqa: BLE001 - a finding: hypothesis printed the shrunk input
        print(f"finding in {name}: {type(e).__name__}: {e}", file=sys.stderr)
        _summary(name, executions, started, 1)
        return 1
    _summary(name, executions, started, 0)
    return 0


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    name, argv = sys.argv[1], sys.argv[2:]
    if "--hypothesis" in argv or atheris is None:
        sys.exit(run_hypothesis(name, [arg for arg in argv if arg != "--hypothesis"]))
    run_atheris(name, argv)


if __name__ == "__main__":
    main()

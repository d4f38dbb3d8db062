"""Writes docs/benchmarks.md's tables from the results under benchmarks/results/, between marker
comments (`<!-- table:NAME -->` ... `<!-- /table:NAME -->`), leaving the prose as it is.

    .venv/bin/python benchmarks/report.py            # rewrite the tables
    .venv/bin/python benchmarks/report.py --check    # exit 1 if the doc differs from the results

Fast and runs no benchmark: a test runs `--check`, so that the doc and the results cannot drift.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

from record import RESULTS, ROOT
from tables import TABLES, render

DOC = ROOT / "docs" / "benchmarks.md"
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)


def generate(text: str, folder: Path) -> str:
    """`text` with every marked table rendered afresh; every table must be marked exactly once."""
    names = [match["name"] for match in BLOCK.finditer(text)]
    if unknown := sorted(set(names) - set(TABLES)):
        raise SystemExit(f"report: unknown tables in the doc: {', '.join(unknown)}")
    if unmarked := sorted(name for name in TABLES if names.count(name) != 1):
        raise SystemExit(f"report: tables not marked exactly once in the doc: {', '.join(unmarked)}")
    return BLOCK.sub(lambda match: f"{match[1]}{render(match['name'], folder)}\n{match[4]}", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the doc is out of date")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON results")
    args = parser.parse_args()
    current = args.doc.read_text()
    fresh = generate(current, args.results)
    if not args.check:
        if fresh != current:
            args.doc.write_text(fresh)
        return
    if fresh != current:
        diff = difflib.unified_diff(current.splitlines(), fresh.splitlines(), str(args.doc), "from the results",
                                    lineterm="")
        print("\n".join(diff))
        sys.exit(f"report: {args.doc} differs from {args.results}: run benchmarks/report.py")


if __name__ == "__main__":
    main()

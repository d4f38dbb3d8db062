"""Conventions of the code that a test can hold: deadlines that never lose a cancellation."""

from __future__ import annotations

import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "apiary"


def test_no_deadline_uses_asyncio_wait_for() -> None:
    """On Python 3.11, `asyncio.wait_for` returns the result of a call that completes in the moment
    its caller is cancelled and loses the cancellation: a background loop cancelled at shutdown
    then runs on, and the service never exits. `async with asyncio.timeout(...)` does not."""
    uses = [f"{path.relative_to(SOURCE)}:{number}"
            for path in sorted(SOURCE.rglob("*.py"))
            for number, line in enumerate(path.read_text().splitlines(), 1)
            if re.search(r"\bwait_for\(", line) and not line.lstrip().startswith("#")]
    assert not uses, f"asyncio.wait_for at {', '.join(uses)}: use `async with asyncio.timeout(...)`"

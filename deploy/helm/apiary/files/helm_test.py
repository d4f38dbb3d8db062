"""`helm test <release>`: this participant's services are ready, its DHT joined the swarm, and an
averaging round succeeded.

Run by the chart's test pod (the dht image's python, standard library only), reading each
service's admin endpoint: every URL of READY (a JSON list) answers /readyz with 200; every DHT of
DHT answers /status with "joined" (and, with EXPECT_NEIGHBOURS=true, at least one neighbour); with
AVERAGERS, their /metrics count at least one round whose result is ok. Each check is retried until
TIMEOUT seconds have passed, each request with its own deadline; the first that fails ends the test
naming what it last saw.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

OK_ROUNDS = re.compile(r'^apiary_averager_rounds_total\{[^}]*result="ok"[^}]*\} ([0-9.e+]+)$', re.MULTILINE)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def wait(what: str, check: Callable[[], tuple[bool, str]], give_up: float, period: float) -> None:
    while True:
        done, seen = check()
        if done:
            print(f"ok: {what} ({seen})", flush=True)
            return
        if time.monotonic() + period > give_up:
            raise SystemExit(f"FAILED: {what}; last seen: {seen}")
        time.sleep(period)


def ready(url: str) -> tuple[bool, str]:
    status, body = get(f"{url}/readyz")
    return status == 200, f"{status} {body[:200]}"


def joined(url: str, neighbours: bool) -> tuple[bool, str]:
    status, body = get(f"{url}/status")
    try:
        found = json.loads(body) if status == 200 else {}
    except ValueError:
        found = {}
    size = found.get("routing_table_size", 0)
    return bool(found.get("joined")) and (size > 0 or not neighbours), f"{status}, joined={found.get('joined')}, neighbours={size}"


def rounds_in(metrics: str) -> float:
    """Successful averaging rounds counted in an averager's /metrics text."""
    return sum(float(n) for n in OK_ROUNDS.findall(metrics))


def rounds(urls: list[str]) -> tuple[bool, str]:
    counts: dict[str, float | str] = {}
    for url in urls:
        status, body = get(f"{url}/metrics")
        counts[url] = rounds_in(body) if status == 200 else f"HTTP {status}"
    return any(isinstance(n, float) and n > 0 for n in counts.values()), f"successful rounds {counts}"


def main() -> None:
    give_up = time.monotonic() + float(os.environ.get("TIMEOUT", "600"))
    period = float(os.environ.get("PERIOD", "5"))
    for url in json.loads(os.environ.get("READY", "[]")):
        wait(f"{url} is ready", lambda: ready(url), give_up, period)
    neighbours = os.environ.get("EXPECT_NEIGHBOURS") == "true"
    for url in json.loads(os.environ.get("DHT", "[]")):
        wait(f"the DHT at {url} joined the swarm", lambda: joined(url, neighbours), give_up, period)
    averagers = json.loads(os.environ.get("AVERAGERS", "[]"))
    if averagers:
        wait("an averaging round succeeded", lambda: rounds(averagers), give_up, period)
    print("every check passed", flush=True)


if __name__ == "__main__":
    sys.exit(main())

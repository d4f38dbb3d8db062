"""`apiary expert-server` on the hosts of a `Network`.

    server = start_expert_server(host, "ffn.0.[0:2]", "--initial-peers", bootstrap)
    wait_until_declared(host, server)     # its experts are in the DHT (its /readyz)
"""

from __future__ import annotations

import time

import httpx

from net.network import Host
from net.processes import HostProcess

SERVED = r"experts served at: \S+\s+admin: http://127\.0\.0\.1:(\d+)"
HIDDEN = 16


def start_expert_server(host: Host, experts: str, *args: str) -> HostProcess:
    """Small `ffn` experts on the CPU, declared every 2 s, on port 7200 of `host` (one torch
    thread: the hosts share the machine's cores); `args` say which DHT to declare them in."""
    return host.apiary("expert-server", "--experts", experts, "--hidden-size", str(HIDDEN), "--device", "cpu",
                       "--declare-period", "2", "--max-wait", "0.001", "--port", "7200", *args,
                       env={"OMP_NUM_THREADS": "1"})


def wait_until_declared(host: Host, server: HostProcess, timeout: float = 120.0) -> None:
    """Waits until the server serves and has declared its experts (its admin /readyz)."""
    deadline = time.monotonic() + timeout
    admin = f"http://{host.forward(int(server.wait_for(SERVED, timeout).group(1)))}"
    while httpx.get(f"{admin}/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, f"{host.name}'s experts were not declared\n{server.report()}"
        time.sleep(0.5)

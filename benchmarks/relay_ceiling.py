"""The ceiling of the user-space latency relay (`tests/net/relay.py`): one TCP stream between
two hosts in network namespaces, unshaped, through a plain veth link (the reference, measured
in the same run) and through relayed links. Shaped link rates must stay below the relay's
ceiling, or the relay, not the shaper, sets the rate.

Cases: veth both ends (reference); the receiver's link relayed (no delay); both links relayed
with 20 ms of RTT each; both relayed with the TAP offloads off (what a link with loss runs:
every frame a wire packet), 20 ms each.

Needs root. Usage: python benchmarks/relay_ceiling.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from net.network import Link, Network, skip_reason
from record import save

# a loss this small drops (almost) nothing but turns the offloads off, as any loss does
NO_OFFLOADS = 1e-9

CASES = [
    ("veth, both hosts (reference)", Link(), Link()),
    ("relay on the receiver's link, no delay", Link(), Link(rtt_ms=0.001)),
    ("relay on both links, 20 ms RTT each", Link(rtt_ms=20), Link(rtt_ms=20)),
    ("relay on both links, 20 ms RTT each, offloads off", Link(rtt_ms=20, loss=NO_OFFLOADS),
     Link(rtt_ms=20, loss=NO_OFFLOADS)),
]


def stream(links: tuple[Link, Link], seconds: float) -> float:
    """Mbit/s of one TCP stream from host 0 to host 1, its first second not counted."""
    with Network(list(links)) as net:
        source, target = net.hosts
        sink = target.python("-m", "net.tools", "sink", "--port", "5001", "--skip", "1.0")
        sink.wait_for("listening", 20)
        source.python("-m", "net.tools", "source", "--to", f"{target.address}:5001", "--seconds", str(seconds))
        return float(sink.result(seconds + 60)["mbit_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each stream")
    args = parser.parse_args()
    if reason := skip_reason():
        sys.exit(f"relay_ceiling: {reason}")
    reference = None
    rates = {}
    for label, *links in CASES:
        rate = rates[label] = stream((links[0], links[1]), args.seconds)
        reference = reference or rate
        print(f"{label:55s} {rate:8.0f} Mbit/s   ratio to veth {rate / reference:.3f}", flush=True)
    save("relay_ceiling", {"seconds": args.seconds, "mbit_per_s": rates})


if __name__ == "__main__":
    main()

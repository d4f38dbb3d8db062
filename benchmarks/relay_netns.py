"""benchmarks/relay.py across network namespaces: the relay, the target and the dialer each on a
host of its own (`tests/net`), every link shaped to the same rate and round-trip time.

The roles are relay.py's own (`--role relay|target`, started on hosts h0 and h1); the dialer
runs `relay.measure` on h2. Direct, the dialer's bytes cross two links (h2's upload, h1's
download); through the relay four (h2 up, h0 down, h0 up, h1 down), so the relayed path has
twice the round-trip time of the direct one, as a relay in another place of the internet
would. Reported as relay.py reports, plus the links; saved as relay-netns.

Needs root (namespaces). Usage:
    python benchmarks/relay_netns.py [--rate 100] [--rtt-ms 50] [--mib 64] [--repeats 3] [--plaintext]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import relay as bench
from record import save


def dialer(args: argparse.Namespace) -> None:
    """Runs on h2: the measurement of relay.py between the roles it is given."""
    figures = asyncio.run(bench.measure(args, json.loads(args.relay_info), json.loads(args.target_info)))
    print(json.dumps(figures), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0, help="Mbit/s of every link, each direction")
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="round-trip time every link adds")
    parser.add_argument("--mib", type=int, default=64, help="tensor size in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plaintext", action="store_true", help="no TLS")
    parser.add_argument("--dialer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--listen-host", default="0.0.0.0", help=argparse.SUPPRESS)
    parser.add_argument("--relay-info", help=argparse.SUPPRESS)
    parser.add_argument("--target-info", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dialer:
        dialer(args)
        return

    from net.network import Link, Network, skip_reason

    if reason := skip_reason():
        raise SystemExit(f"relay_netns: {reason}")
    common = ["--mib", str(args.mib), "--repeats", str(args.repeats), *(["--plaintext"] if args.plaintext else [])]
    script = str(Path(bench.__file__).resolve())
    with Network([Link(rate_mbit=args.rate, rtt_ms=args.rtt_ms)] * 3) as net:
        h0, h1, h2 = net.hosts
        relay = h0.python(script, "--role", "relay", "--listen-host", h0.address, *common, stdin=True, name="relay")
        relay_info = relay.result(120)
        target = h1.python(script, "--role", "target", "--relay", relay_info["relay"], "--listen-host", h1.address,
                           *common, stdin=True, name="target")
        target_info = target.result(120)
        measuring = h2.python(__file__, "--dialer", "--listen-host", h2.address, "--relay-info", json.dumps(relay_info),
                              "--target-info", json.dumps(target_info), *common, name="dialer")
        figures = measuring.result(60 + 4 * (args.repeats + 1) * args.mib * 8 / args.rate)
    figures["links"] = {"mbit_per_s": args.rate, "rtt_ms": args.rtt_ms}
    rates = figures["mb_per_s"]
    print(f"{args.mib} MiB tensor, three hosts on {args.rate:g} Mbit/s links of {args.rtt_ms:g} ms RTT each, "
          f"{'TLS' if figures['tls'] else 'plaintext'}, median of {args.repeats}")
    print(f"bulk direct                 {rates['direct']:8.2f} MB/s")
    print(f"bulk through the relay      {rates['relayed']:8.2f} MB/s   ratio to direct {figures['ratio']:.2f}")
    print(f"relay CPU                   {figures['relay_cpu_s_per_gbit']:8.3f} s per Gbit relayed")
    print(f"reservation held / usable   {figures['reservation_s']:8.3f} s / {figures['usable_reservation_s']:.3f} s "
          f"from the target's start")
    print(f"Ping direct / relayed       {figures['ping_ms']['direct']:8.2f} ms / {figures['ping_ms']['relayed']:.2f} ms")
    save("relay", figures, preset="netns")


if __name__ == "__main__":
    main()

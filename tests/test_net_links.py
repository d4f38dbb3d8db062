"""The network harness itself: links deliver the latency, rate, jitter and loss they are given;
partitions cut and heal; a dial-out-only host cannot be dialled; nothing is left behind, also
after a failed test or a crashed run.

Measured with `net.tools` (UDP round trips as ping, one TCP stream as iperf) between hosts in
network namespaces.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

import pytest
from net.network import Host, Link, Network, namespaces, remove_stale, run, skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


def ping(source: Host, target: Host, count: int = 20, interval: float = 0.02, timeout: float = 1.0) -> dict:
    echo = target.python("-m", "net.tools", "echo", "--port", "5002")
    echo.wait_for("listening", 20)
    report = source.python("-m", "net.tools", "ping", "--to", f"{target.address}:5002", "--count", str(count),
                           "--interval", str(interval), "--timeout", str(timeout)).result(60)
    echo.kill()
    return report


def throughput(source: Host, target: Host, seconds: float = 5.0) -> float:
    """Mbit/s of one TCP stream, not counting its first second (slow start is not the link's rate)."""
    sink = target.python("-m", "net.tools", "sink", "--port", "5001", "--skip", "1.0")
    sink.wait_for("listening", 20)
    source.python("-m", "net.tools", "source", "--to", f"{target.address}:5001", "--seconds", str(seconds))
    return float(sink.result(seconds + 30)["mbit_per_s"])


def test_a_shaped_link_delivers_its_latency_and_rate() -> None:
    # h0 -> h1 crosses h0's upload (40 Mbit/s) and h1's download (100); h2 -> h3: veth only, 100 each
    links = [Link(rate_mbit=40, rtt_ms=30), Link(rate_mbit=100, rtt_ms=70), Link(rate_mbit=100), Link(rate_mbit=100)]
    with Network(links) as net:
        h0, h1, h2, h3 = net.hosts
        rtts = ping(h0, h1)["rtts_ms"][1:]  # the first one also resolves the address (ARP)
        relayed = throughput(h0, h1)
        reverse = throughput(h1, h0)
        plain = throughput(h2, h3)
    assert 100 <= statistics.median(rtts) <= 100 * 1.15, rtts
    assert min(rtts) >= 99, rtts
    assert 40 * 0.85 <= relayed <= 40 * 1.15, relayed
    assert 40 * 0.85 <= reverse <= 40 * 1.15, reverse  # h0's download is 40 too
    assert 100 * 0.85 <= plain <= 100 * 1.15, plain
    assert net.leftovers() == []


def test_jitter_spreads_round_trips_and_loss_drops_frames() -> None:
    with Network([Link(rtt_ms=40, jitter_ms=10, loss=0.1), Link()]) as net:
        report = ping(net.hosts[0], net.hosts[1], count=150, interval=0.01, timeout=0.3)
    rtts = sorted(report["rtts_ms"][1:])  # the first one also resolves the address (ARP)
    # each way 20 ms ± 10 (frames keep their order, so a frame may wait for the one before it)
    assert rtts[0] >= 20 - 0.5, rtts
    assert 35 <= statistics.median(rtts) <= 55, rtts
    assert rtts[int(0.9 * len(rtts))] - rtts[int(0.1 * len(rtts))] >= 10, rtts
    # a round trip survives with probability 0.9 * 0.9: about 28 of 150 lost
    assert 12 <= report["lost"] <= 55, report["lost"]


def test_partitions_cut_and_heal_and_a_dial_out_only_host_cannot_be_dialled() -> None:
    with Network([Link(), Link(), Link(dial_out_only=True)]) as net:
        h0, h1, nat = net.hosts
        assert ping(h0, h1, count=3)["lost"] == 0
        net.partition([h0], [h1, nat])
        assert ping(h0, h1, count=3, timeout=0.3)["lost"] == 3
        assert ping(nat, h1, count=3)["lost"] == 0
        net.heal()
        assert ping(h0, h1, count=3)["lost"] == 0

        # the dial-out-only host answers nothing it did not ask for, but its own flows work
        assert ping(nat, h0, count=3)["lost"] == 0
        assert ping(h0, nat, count=3, timeout=0.3)["lost"] == 3
        listener = nat.python("-m", "net.tools", "listen", "--port", "5003")
        listener.wait_for("listening", 20)
        dialled_in = h0.python("-m", "net.tools", "connect", "--to", f"{nat.address}:5003", "--timeout", "2").result()
        assert dialled_in["connected"] is False and "timed out" in dialled_in["error"], dialled_in
        public = h0.python("-m", "net.tools", "listen", "--port", "5003")
        public.wait_for("listening", 20)
        assert nat.python("-m", "net.tools", "connect", "--to", f"{h0.address}:5003").result()["connected"] is True
    assert net.leftovers() == []


def test_everything_is_removed_when_a_test_fails_inside() -> None:
    with pytest.raises(RuntimeError, match="the test failed"), Network([Link(rtt_ms=10, rate_mbit=50), Link()]) as net:
        sleeper = net.hosts[0].start(["sleep", "600"])
        assert sleeper.alive and net.hosts[0].relay is not None
        raise RuntimeError("the test failed")
    assert net.leftovers() == []
    assert not any(name.startswith(f"{net.prefix}-") for name in namespaces())
    assert not sleeper.alive and not net.hosts[0].relay.alive


def test_what_a_crashed_run_left_behind_is_removed_at_the_next_start() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = f"apnet-{gone.pid}-0-h0"  # named like a network of a process that no longer exists
    run("ip", "netns", "add", stale)
    run("ip", "-n", stale, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    orphan = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "600"], start_new_session=True)
    try:
        with Network(1) as net:  # a new network cleans up first
            assert stale not in namespaces()
            assert net.switch in namespaces()
        assert orphan.wait(10) == -9
        assert remove_stale() == []
    finally:
        if orphan.poll() is None:
            orphan.kill()
        if stale in namespaces():
            run("ip", "netns", "delete", stale)


def test_without_root_the_tests_skip_with_the_reason() -> None:
    result = subprocess.run(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--", sys.executable, "-c",
         "from net.network import skip_reason; print(skip_reason())"],
        check=False, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    assert "need root" in result.stdout

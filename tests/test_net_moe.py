"""An expert server behind 300 ms of latency: mixture-of-experts steps that need k_min answers
finish within their timeout, using the nearer servers.

Five hosts in network namespaces: a dht, two expert servers 20 ms from the switch, one 300 ms
from it, and a trainer (`net.moe_client`) 20 ms from it, so the trainer is 40 ms from the near
servers and 320 ms from the far one. The grid `ffn` is 3×2: row 0 on one near server, row 1
on the other, row 2 on the far one. Every sample picks all six experts (k_best = 6) and waits
for four (k_min = 4), then 50 ms more: the calls of a step (forward and backward) must not
wait for the far server, which a pass that waits for every expert shows to be there and slow.
(The beam search before the calls reads the DHT, whose nodes include the far server's: a
lookup for the newest declarations waits for its answer too, so only the calls are timed
against the far server's round trip.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from net.experts import start_expert_server, wait_until_declared
from net.network import Link, Network, skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

NEAR, FAR = Link(rtt_ms=20), Link(rtt_ms=300)
FAR_RTT = 0.32  # seconds between the trainer and the far server
STEPS, TIMEOUT = 20, 2.0
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # torch's threads: the hosts share 2 cores


@pytest.fixture
def network() -> Iterator[Network]:
    with Network([NEAR, NEAR, NEAR, FAR, NEAR]) as net:
        yield net
    assert net.leftovers() == []


@pytest.mark.timeout(180)
def test_steps_with_k_min_finish_using_the_near_servers_while_one_is_300ms_away(network: Network) -> None:
    dht_host, near_a, near_b, far, trainer_host = network.hosts
    dht = dht_host.apiary("dht", "--new-swarm", "--port", "7000")
    bootstrap = dht.wait_for(r"others join with: --initial-peers (\S+)").group(1)
    servers = [start_expert_server(host, f"ffn.{row}.[0:2]", "--initial-peers", bootstrap)
               for row, host in enumerate((near_a, near_b, far))]
    for host, server in zip((near_a, near_b, far), servers):
        wait_until_declared(host, server)

    trainer = trainer_host.python(
        "-m", "net.moe_client", "--initial-peers", bootstrap, "--grid", "3,2", "--k-best", "6", "--k-min", "4",
        "--timeout", str(TIMEOUT), "--after-k-min", "0.05", "--steps", str(STEPS), "--wait-all-passes", "3",
        env=ONE_THREAD, name="moe trainer")
    report = trainer.result(150)
    assert trainer.wait(10) == 0, trainer.report()

    steps = report["steps"]
    assert len(steps) == STEPS  # none failed for want of answers
    for step in steps:
        assert step["dispatch"] < TIMEOUT and step["backward"] < TIMEOUT, step  # each within its timeout
        assert step["chosen"] == {"0": 64, "1": 64, "2": 64}, step  # 32 samples × 2 experts per row
        assert step["answered"]["0"] == 64 and step["answered"]["1"] == 64, step  # the near servers always answer
    far_answers = [step["answered"].get("2", 0) for step in steps]
    assert sum(answer > 0 for answer in far_answers) <= STEPS // 5, far_answers  # ... the far one hardly in time
    # waiting for the far server would take at least one of its round trips, each way of the step
    assert report["median_dispatch"] < FAR_RTT and report["median_backward"] < FAR_RTT, report
    # it is there, and slow: a pass that waits for every expert gets its answers, a round trip later
    for full in report["wait_all_passes"]:
        assert full["answered"] == {"0": 64, "1": 64, "2": 64}, full
        assert full["dispatch"] >= FAR_RTT, full
    assert report["loss_end"] < report["loss_start"], report
    print(f"with k_min: median forward calls {report['median_dispatch'] * 1000:.0f} ms, backward "
          f"{report['median_backward'] * 1000:.0f} ms, step with beam search {report['median_seconds'] * 1000:.0f} ms; "
          f"waiting for the far server: {min(p['dispatch'] for p in report['wait_all_passes']) * 1000:.0f} ms; far "
          f"answers in time in {sum(a > 0 for a in far_answers)}/{STEPS} steps; "
          f"loss {report['loss_start']:.3f} -> {report['loss_end']:.3f}")
    for process in [dht, *servers]:
        assert process.alive, process.report()

"""The swarm records, the monitor's JSON API and `apiary status --json`, against a real swarm: two
participants' dht, averager and trainer of one run and an expert server (the swarm of
test_monitoring_dashboards), seen by an `apiary monitor` that joins the DHT as a client, by an
`apiary dht --monitor` and by `apiary status`."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from service_processes import APIARY, ServiceProcess, ServiceProcesses
from test_monitoring_dashboards import EXPERTS, RUN, Swarm

import apiary
from apiary.moe.names import expand_expert_names
from apiary.services.reachability import ReachabilityState

WAIT_S = 90.0


@pytest.fixture(scope="module")
def processes() -> Iterator[ServiceProcesses]:
    with ServiceProcesses() as started:
        yield started


@pytest.fixture(scope="module")
def swarm(processes: ServiceProcesses) -> Swarm:
    return Swarm(processes)


@pytest.fixture(scope="module")
def monitor(swarm: Swarm, processes: ServiceProcesses) -> ServiceProcess:
    """`apiary monitor`, a client of the DHT (no port of its own in the swarm), reading every second."""
    return processes.start("monitor", "--initial-peers", swarm.dhts[0].initial_peers, "--refresh", "1",
                           host_flag="--admin-host").wait_until_up(until="monitor: ")


def api(process: ServiceProcess, path: str, prefix: str = "") -> dict[str, Any]:
    response = httpx.get(f"{process.admin}{prefix}/api/{path}", timeout=10)
    response.raise_for_status()
    return response.json()


def wait_for(what: str, read: Callable[[], Any], done: Callable[[Any], bool], timeout: float = WAIT_S) -> Any:
    """Reads until `done(value)`; fails with the last value read after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = read()
        except httpx.HTTPStatusError as e:  # 503 until the first reading
            value = e.response.text
        else:
            if done(value):
                return value
        assert time.monotonic() < deadline, f"{what}: {json.dumps(value, indent=1)[:4000]}"
        time.sleep(0.5)


def services_by_peer(swarm: Swarm) -> dict[str, str]:
    """peer id -> kind of every service of the swarm, from their own /status."""
    return {p.status()["peer_id"]: kind for kind, started in swarm.services().items() for p in started}


def trainer_signers(swarm: Swarm) -> set[str]:
    """The ids that sign the trainers' progress: their participants' dht nodes."""
    return {dht.status()["peer_id"] for dht in swarm.dhts}


@pytest.mark.timeout(300)
def test_every_service_publishes_a_signed_peer_record_the_api_lists(swarm: Swarm, monitor: ServiceProcess) -> None:
    expected = services_by_peer(swarm)
    peers = wait_for("peer records", lambda: api(monitor, "peers"),
                     lambda p: {r["peer_id"]: r["kind"] for r in p["peers"]} == expected)
    assert peers["count"] == len(expected) == 7
    assert peers["by_kind"] == {"averager": 2, "dht": 2, "expert-server": 1, "trainer": 2}
    dht_ids = trainer_signers(swarm)
    for record in peers["peers"]:
        assert record["version"] == apiary.__version__
        assert record["reachability"] in {state.value for state in ReachabilityState}
        assert record["device"].startswith("cpu (")
        assert record["uptime_seconds"] > 0 and record["age_seconds"] >= 0
        assert record["run"] == (RUN if record["kind"] in {"averager", "trainer"} else None)
        assert any(a.startswith(record["peer_id"] + "@") for a in record["addresses"]), record
        # signed by the service's own DHT node (dht services) or by its participant's dht service
        assert record["signer"] == record["peer_id"] if record["kind"] == "dht" else record["signer"] in dht_ids
    experts = next(r for r in peers["peers"] if r["kind"] == "expert-server")
    assert sorted(experts["experts"]) == sorted(expand_expert_names(EXPERTS))


@pytest.mark.timeout(300)
def test_the_run_shows_the_swarm_epoch_throughput_loss_and_each_peers_contribution(
        swarm: Swarm, monitor: ServiceProcess) -> None:
    def run() -> dict[str, Any]:
        return next((r for r in api(monitor, "runs")["runs"] if r["run"] == RUN), {})

    shown = wait_for("the run", run, lambda r: bool(r) and r["peers"] == 2 and r["samples_per_second"] > 0
                     and r["loss"] is not None and len(r["history"]) >= 3)
    assert {e["peer_id"] for e in shown["leaderboard"]} == trainer_signers(swarm)
    assert all(e["contributed"] >= e["samples"] >= 0 for e in shown["leaderboard"])
    assert [e["contributed"] for e in shown["leaderboard"]] == sorted((e["contributed"] for e in shown["leaderboard"]),
                                                                      reverse=True)
    assert [p["time"] for p in shown["history"]] == sorted(p["time"] for p in shown["history"])
    assert {e["event"] for e in shown["events"]} == {"joined"}
    assert {e["kind"] for e in shown["events"]} == {"averager", "trainer"}
    # the epoch the monitor shows is the trainers' swarm epoch (read at about the same time)
    wait_for("the run's epoch", lambda: (run()["epoch"], {t.status()["swarm_epoch"] for t in swarm.trainers}),
             lambda both: both[1] == {both[0]})


@pytest.mark.timeout(300)
def test_the_expert_grid_shows_which_server_declares_each_expert(swarm: Swarm, monitor: ServiceProcess) -> None:
    server = swarm.experts.status()["peer_id"]
    grids = wait_for("the expert grid", lambda: api(monitor, "experts"),
                     lambda e: bool(e["grids"]) and e["grids"][0]["declared"] == 12)["grids"]
    assert [g["prefix"] for g in grids] == ["digits"]
    (grid,) = grids
    assert grid["servers"] == 1
    assert sorted(e["name"] for e in grid["experts"]) == sorted(expand_expert_names(EXPERTS))
    for expert in grid["experts"]:
        assert expert["server"] == server and expert["address"].startswith(server + "@")
        assert expert["coordinates"] == [int(c) for c in expert["name"].split(".")[1:]]
        assert expert["load"] is not None

    # the trainers call the experts: the server publishes its recent latency, the grid shows it
    latency = lambda experts: {(e["forward_seconds"], e["backward_seconds"]) for g in experts["grids"]  # noqa: E731
                               for e in g["experts"]}
    shown = wait_for("the experts' latency", lambda: latency(api(monitor, "experts")),
                     lambda seen: len(seen) == 1 and None not in next(iter(seen)))
    ((forward, backward),) = shown
    assert 0 < forward < 10 and 0 < backward < 10
    status = swarm.experts.status()
    assert status["forward_seconds"] > 0 and status["backward_seconds"] > 0
    record = next(r for r in api(monitor, "peers")["peers"] if r["kind"] == "expert-server")
    assert record["info"]["forward_seconds"] > 0 and record["info"]["backward_seconds"] > 0
    page = httpx.get(f"{monitor.admin}/", timeout=10).text
    assert "<th>forward</th><th>backward</th>" in page and " ms</td>" in page


@pytest.mark.timeout(300)
def test_averagers_publish_their_recent_rounds(swarm: Swarm, monitor: ServiceProcess) -> None:
    averagers = {p.status()["peer_id"] for p in swarm.averagers}

    def ok_rounds(rounds: dict[str, Any]) -> list[dict[str, Any]]:
        runs = [r for r in rounds["runs"] if r["run"] == RUN]
        return [r for r in runs[0]["rounds"] if r["result"] == "ok"] if runs else []

    rounds = wait_for("rounds of both averagers", lambda: api(monitor, "rounds"),
                      lambda r: {e["peer_id"] for e in ok_rounds(r)} == averagers, timeout=180)
    for entry in ok_rounds(rounds):
        assert entry["group_size"] == 2 and entry["seconds"] > 0 and entry["bytes"] > 0
    (run,) = rounds["runs"]
    assert run["averagers"] == 2 and run["results"]["ok"] >= 2


@pytest.mark.timeout(300)
def test_apiary_status_json_shows_what_the_monitor_shows(swarm: Swarm, monitor: ServiceProcess) -> None:
    wait_for("a monitor reading with every peer", lambda: api(monitor, "peers"), lambda p: p["count"] == 7)
    result = subprocess.run([*APIARY, "status", "--dht-local", str(swarm.dhts[1].local_api), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    shown = api(monitor, "swarm")
    peers = lambda swarm_json: {(p["peer_id"], p["kind"], p["signer"], p["run"]) for p in swarm_json["peers"]["peers"]}  # noqa: E731
    assert peers(status) == peers(shown)
    assert status["peers"]["by_kind"] == shown["peers"]["by_kind"]
    assert [(r["run"], {e["peer_id"] for e in r["leaderboard"]}) for r in status["runs"]["runs"]] == [
        (r["run"], {e["peer_id"] for e in r["leaderboard"]}) for r in shown["runs"]["runs"]]
    assert abs(status["runs"]["runs"][0]["epoch"] - shown["runs"]["runs"][0]["epoch"]) <= 1
    expert_grid = lambda swarm_json: [(g["prefix"], [(e["name"], e["server"]) for e in g["experts"]])  # noqa: E731
                                      for g in swarm_json["experts"]["grids"]]
    assert expert_grid(status) == expert_grid(shown)

    tables = subprocess.run([*APIARY, "status", "--dht-local", str(swarm.dhts[1].local_api)],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert tables.returncode == 0, tables.stderr
    assert "7 peers (2 averager, 2 dht, 1 expert-server, 2 trainer)" in tables.stdout
    assert f"run {RUN}: epoch" in tables.stdout


@pytest.mark.timeout(300)
def test_a_dht_service_serves_the_monitor_on_its_admin_endpoint(swarm: Swarm, processes: ServiceProcesses) -> None:
    dht = processes.start("dht", "--initial-peers", swarm.dhts[0].initial_peers, "--monitor").wait_until_up(
        until="monitor: ")
    own = dht.status()["peer_id"]
    peers = wait_for("the dht's monitor", lambda: api(dht, "peers", "/monitor"),
                     lambda p: p["count"] == 8 and own in {r["peer_id"] for r in p["peers"]})
    assert peers["by_kind"]["dht"] == 3
    page = httpx.get(f"{dht.admin}/monitor", timeout=10, follow_redirects=True)
    assert page.status_code == 200 and page.url.path == "/monitor/"
    assert '<span class="count" id="peer-count">8</span>' in page.text
    assert httpx.get(f"{dht.admin}/monitor/static/uplot/uPlot.iife.min.js", timeout=10).status_code == 200
    assert dht.get("/healthz").status_code == 200  # the admin routes stay where they were


def test_status_needs_one_way_to_the_dht() -> None:
    result = subprocess.run([*APIARY, "status"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("apiary: error:") and "--dht-local" in result.stderr

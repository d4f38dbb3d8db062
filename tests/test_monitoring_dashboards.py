"""The monitoring proven against a real Prometheus (Debian's package): it scrapes a running swarm
(two participants' dht, averager and trainer, and an expert server their trainers call; one dht
relays) with the repository's deploy/prometheus configuration, loads the alert rules, and every
query of every Grafana dashboard panel returns data through Prometheus' HTTP API, with the
dashboards' `instance` and `run` variables selecting what they name."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from service_processes import ServiceProcess, ServiceProcesses
from test_deploy_dashboards import DASHBOARDS, panels

import apiary
from deploy.apt import NotInstallable
from deploy.prometheus import PrometheusServer, alert_rules, tools

RUN = "watched"
DATA_TIMEOUT_S = 240.0
ROUNDS = ("--target-group-size", "2", "--min-group-size", "2", "--expected-peers", "2", "--gather-seconds", "1",
          "--join-seconds", "2", "--round-timeout", "20", "--sender-timeout", "5")
EXPERTS = "digits.[0:3].[0:4]"
VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s"}


class Swarm:
    """Two participants of run RUN (dht, averager, trainer of the digits_moe task; the first dht relays) and an
    expert server."""

    def __init__(self, processes: ServiceProcesses):
        self.dhts = [processes.start("dht", "--new-swarm", "--relay").wait_until_up()]  # relays: the relay panels' metrics
        self.dhts.append(processes.start("dht", "--initial-peers", self.dhts[0].initial_peers).wait_until_up())
        self.experts = processes.start("expert-server", "--experts", EXPERTS, "--hidden-size", "32", "--device", "cpu",
                                       "--dht-local", str(self.dhts[0].local_api))
        self.averagers = [processes.start("averager", "--run-id", RUN, *ROUNDS, "--dht-local", str(dht.local_api))
                          for dht in self.dhts]
        self.experts.wait_until_up(until="experts served at: ")
        options = json.dumps({"initial_peers": self.dhts[0].initial_peers, "batch_size": 32})
        self.trainers = []
        for index, (dht, averager) in enumerate(zip(self.dhts, self.averagers)):
            averager.wait_until_up()
            self.trainers.append(processes.start(
                "trainer", "--run-id", RUN, "--task", "digits_moe", "--task-options", options, "--seed", str(index),
                "--target-batch-size", "128", "--dht-local", str(dht.local_api), "--averager-local",
                str(averager.local_api), "--device", "cpu", "--threads", "1", "--min-peers", "2"))
        for trainer in self.trainers:
            trainer.wait_until_up(timeout=120, until="training")

    def services(self) -> dict[str, list[ServiceProcess]]:
        return {"dht": self.dhts, "averager": self.averagers, "expert-server": [self.experts],
                "trainer": self.trainers}


def address(process: ServiceProcess) -> str:
    return process.admin.removeprefix("http://")


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    try:
        tools()
    except NotInstallable as e:
        pytest.skip(f"Debian's prometheus cannot be had: {e}")
    with ServiceProcesses() as processes:
        yield Swarm(processes)


@pytest.fixture(scope="module")
def prometheus(swarm: Swarm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """Prometheus with deploy/prometheus/prometheus.yml, each service's target its processes here."""
    targets = {service: [address(p) for p in processes] for service, processes in swarm.services().items()}
    with PrometheusServer(tmp_path_factory.mktemp("prometheus"), targets) as server:
        yield server


def substitute(expression: str, instance: str = ".*", run: str = ".*") -> str:
    """A panel's query as Grafana sends it with these variable values."""
    for name, value in {**VARIABLES, "$instance": instance, "$run": run}.items():
        expression = expression.replace(name, value)
    return expression


def has_data(result: list[dict[str, Any]]) -> bool:
    """Grafana draws something: a series with a number (not NaN) in it."""
    return any(not math.isnan(float(series["value"][1])) for series in result)


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, query) of every panel."""
    found = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        found += [(path.stem, panel["title"], target["expr"]) for panel in panels(dashboard)
                  for target in panel.get("targets", [])]
    return found


@pytest.mark.timeout(600)
def test_prometheus_scrapes_every_service_of_the_swarm_with_the_repositorys_configuration(
        swarm: Swarm, prometheus: PrometheusServer) -> None:
    expected = {address(p) for processes in swarm.services().values() for p in processes}
    deadline = time.monotonic() + 60
    while {t["labels"]["instance"] for t in prometheus.api("targets")["activeTargets"] if t["health"] == "up"} != expected:
        assert time.monotonic() < deadline, prometheus.api("targets")
        time.sleep(0.5)
    builds = prometheus.query("apiary_build_info")
    assert {(s["metric"]["instance"], s["metric"]["version"]) for s in builds} == {(i, apiary.__version__) for i in expected}
    runs = prometheus.wait_for('apiary_run_info', 30)
    assert {(s["metric"]["instance"], s["metric"]["run"]) for s in runs} == {
        (address(p), RUN) for p in (*swarm.averagers, *swarm.trainers)}


@pytest.mark.timeout(600)
def test_every_panel_of_every_dashboard_shows_data_of_the_running_swarm(prometheus: PrometheusServer) -> None:
    waiting = {(d, title, substitute(expr, run=RUN)) for d, title, expr in dashboard_queries()}
    deadline = time.monotonic() + DATA_TIMEOUT_S
    while waiting and time.monotonic() < deadline:
        waiting = {query for query in waiting if not has_data(prometheus.query(query[2]))}
        time.sleep(2)
    assert not waiting, "panels without data:\n" + "\n".join(f"{d}: {title}: {expr}" for d, title, expr in sorted(waiting))


@pytest.mark.timeout(300)
def test_the_instance_and_run_variables_select_what_they_name(swarm: Swarm, prometheus: PrometheusServer) -> None:
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        wanted = {"instance": "apiary_build_info"}
        if any("$run" in target["expr"] for panel in panels(dashboard) for target in panel.get("targets", [])):
            wanted["run"] = "apiary_run_info"
        assert set(variables) == {"datasource", *wanted}, path.name
        for name, metric in wanted.items():
            assert variables[name]["query"]["query"] == f"label_values({metric}, {name})", path.name
            assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*", path.name
    instances = set(prometheus.api("label/instance/values", **{"match[]": "apiary_build_info"}))
    assert instances == {address(p) for processes in swarm.services().values() for p in processes}
    assert prometheus.api("label/run/values", **{"match[]": "apiary_run_info"}) == [RUN]

    trainer = address(swarm.trainers[0])
    for dashboard, title, expr in dashboard_queries():
        assert "$instance" in expr, f"{dashboard}: {title} ignores the instance variable"
        if "$run" in expr:
            assert not prometheus.query(substitute(expr, run="another-run")), f"{dashboard}: {title}"
        if re.search(r"apiary_trainer_\w+", expr) and "sum" not in expr:
            shown = {s["metric"].get("instance") for s in prometheus.query(substitute(expr, instance=trainer))}
            assert shown == {trainer}, f"{dashboard}: {title}: {shown}"


@pytest.mark.timeout(120)
def test_prometheus_loads_the_alert_rules_and_evaluates_them(prometheus: PrometheusServer) -> None:
    deadline = time.monotonic() + 30
    while True:  # a rule's health is "unknown" until its first evaluation
        rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
        if rules and all(rule["health"] == "ok" for rule in rules):
            break
        assert time.monotonic() < deadline, rules
        time.sleep(1)
    assert {rule["name"] for rule in rules} == set(alert_rules())

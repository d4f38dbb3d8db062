"""The Grafana dashboards (deploy/grafana/dashboards): Grafana's provisioning format, and every
metric they query is one the real services export, read from the /metrics of each service
started as compose.yaml configures it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis_server import RedisServer

from apiary.telemetry import metric_prefix
from deploy.bundle import LocalBundle
from deploy.files import REPO, SERVICES
from deploy.metrics import exported_names, promql_metrics

GRAFANA = REPO / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
GRID_COLUMNS = 24


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in panels(dashboard) for target in panel.get("targets", [])]


def service_of(metric: str) -> str | None:
    """The service whose metric prefix a name carries (None for process_* and other shared names)."""
    return next((s for s in sorted(SERVICES, key=len, reverse=True) if metric.startswith(metric_prefix(s) + "_")), None)


def test_the_dashboards_cover_swarm_experts_averaging_and_training() -> None:
    uids = {json.loads(path.read_text())["uid"] for path in DASHBOARDS}
    assert uids == {"apiary-swarm", "apiary-experts", "apiary-averaging", "apiary-training"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboards_are_in_grafanas_provisioning_format(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert "dashboard" not in dashboard and "id" not in dashboard  # a bare model: Grafana assigns the id
    assert dashboard["title"] and len(dashboard["uid"]) <= 40 and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= GRID_COLUMNS and grid["h"] > 0
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])


def test_the_provisioning_files_load_the_data_source_and_the_dashboards() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert datasources["apiVersion"] == 1
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True and source["access"] == "proxy"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "apiary.yaml").read_text())
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


def test_the_metric_name_reader_finds_selected_metrics_only() -> None:
    expression = ('histogram_quantile(0.95, sum by (le, method) (rate(apiary_dht_rpc_duration_seconds_bucket'
                  '{code!="OK", job=~"$job"}[$__rate_interval]))) / ignoring(method) group_left '
                  'sum(increase(apiary_trainer_samples_total[1h])) + on(instance) process_resident_memory_bytes')
    assert promql_metrics(expression) == {"apiary_dht_rpc_duration_seconds_bucket", "apiary_trainer_samples_total",
                                          "process_resident_memory_bytes"}


def test_the_exported_name_reader_expands_counters_and_histograms() -> None:
    page = ("# HELP x_total Things\n# TYPE x_total counter\nx_total 3.0\n"
            "# HELP t_seconds Time\n# TYPE t_seconds histogram\n"
            "# HELP g Gauge\n# TYPE g gauge\ng 1.0\n")
    assert exported_names(page) >= {"x_total", "t_seconds_bucket", "t_seconds_sum", "t_seconds_count", "g"}
    assert "x" not in exported_names(page) and "t_seconds" not in exported_names(page)


@pytest.fixture(scope="module")
def bundle(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBundle]:
    redis_server.start()
    with LocalBundle(tmp_path_factory.mktemp("bundle"), redis_server.url) as running:
        yield running


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_metric_a_dashboard_queries_is_exported(path: Path, bundle: LocalBundle) -> None:
    wanted = set().union(*(promql_metrics(expr) for expr in queries(json.loads(path.read_text()))))
    services = sorted({service_of(m) for m in wanted} - {None}) or ["dht"]
    exported: dict[str, set[str]] = {}
    for service in services:
        bundle.start(service)
        page = bundle.get(service, "/metrics")
        assert page.status_code == 200
        exported[service] = exported_names(page.text)
    missing = sorted(m for m in wanted  # a shared name (process_*, apiary_run_info): from one of them
                     if m not in exported.get(service_of(m) or "", set.union(*exported.values())))
    assert not missing, f"{path.name} queries metrics no service exports: {missing}"

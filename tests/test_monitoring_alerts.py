"""The alert rules (deploy/prometheus/rules): valid for Prometheus (`promtool check rules`), each
alert firing on a faulty series and not on a healthy one (`promtool test rules` with
deploy/prometheus/tests), the alerts an operator needs, and each explained in docs/operations.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from service_processes import ServiceProcesses

from apiary.wire import Identity
from apiary.wire.auth import AccessToken
from deploy import helm, prometheus
from deploy.apt import NotInstallable
from deploy.files import REPO

ALERTS = {
    "ApiaryTargetDown", "ApiaryDhtIsolated", "ApiaryAveragingRoundsFailing", "ApiaryTrainerStalled",
    "ApiaryEpochLagging", "ApiaryAccessTokenExpiringSoon", "ApiaryExpertServerErrors", "ApiaryExpertQueueSaturated",
}


@pytest.fixture(scope="module", autouse=True)
def promtool_installed() -> None:
    try:
        prometheus.tools()
    except NotInstallable as e:
        pytest.skip(f"Debian's prometheus (promtool) cannot be had: {e}")


@pytest.mark.parametrize("path", prometheus.RULES, ids=lambda p: p.name)
def test_promtool_accepts_the_rules(path: Path) -> None:
    result = prometheus.promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", prometheus.RULE_TESTS, ids=lambda p: p.name)
def test_the_rules_pass_their_unit_tests(path: Path) -> None:
    result = prometheus.promtool("test", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_tests_cover_every_alert_and_load_every_rule_file() -> None:
    tested, loaded = set(), set()
    for path in prometheus.RULE_TESTS:
        spec = yaml.safe_load(path.read_text())
        loaded |= {(path.parent / rules).resolve() for rules in spec["rule_files"]}
        tested |= {case["alertname"] for test in spec["tests"] for case in test.get("alert_rule_test", [])}
    assert loaded == {path.resolve() for path in prometheus.RULES}
    assert tested == set(prometheus.alert_rules())


def test_the_rules_alert_on_what_an_operator_must_act_on() -> None:
    rules = prometheus.alert_rules()
    assert set(rules) >= ALERTS
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_the_operations_guide_says_what_to_do_when_each_alert_fires() -> None:
    guide = (REPO / "docs" / "operations.md").read_text()
    section = guide.split("\n## Alerts\n", 1)[1].split("\n## ", 1)[0]
    explained = set(re.findall(r"^### `(\w+)`", section, flags=re.MULTILINE))
    assert explained == set(prometheus.alert_rules())


def test_a_service_of_a_private_run_exports_when_its_token_expires(tmp_path: Path) -> None:
    authority, peer = Identity.generate(), Identity.generate()
    peer.save(tmp_path / "dht.key")
    token = AccessToken.issue(authority, peer.peer_id, expires_in=3 * 86400)
    (tmp_path / "dht.token").write_text(token.encode())
    with ServiceProcesses() as services:
        dht = services.start("dht", "--new-swarm", "--identity", str(tmp_path / "dht.key"), "--run-authority", authority.peer_id,
                             "--access-token", str(tmp_path / "dht.token")).wait_until_up()
        page = dht.get("/metrics").text
    samples = {s.name: s.value for family in text_string_to_metric_families(page) for s in family.samples}
    assert samples["apiary_access_token_expiry_timestamp_seconds"] == token.expires_at  # what the alert reads


def test_the_chart_ships_the_rules_as_a_prometheus_rule_when_asked(tmp_path: Path) -> None:
    assert not [m for m in helm.render(None) if m["kind"] == "PrometheusRule"]  # off by default
    manifests = helm.render(helm.values_of("monitoring"))
    rule = helm.find(manifests, "PrometheusRule", "")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # what the operator selects
    groups = [group for path in prometheus.RULES for group in yaml.safe_load(path.read_text())["groups"]]
    assert rule["spec"]["groups"] == groups
    rendered = tmp_path / "rendered.rules.yml"
    rendered.write_text(yaml.safe_dump(rule["spec"]))
    result = prometheus.promtool("check", "rules", rendered)
    assert result.returncode == 0, result.stdout + result.stderr

"""Debian's Prometheus for the monitoring tests: promtool, and a server scraping local services
with the repository's configuration (deploy/prometheus) adapted to this host.

    with PrometheusServer(directory, {"dht": ["127.0.0.1:9101"], ...}) as prometheus:
        prometheus.wait_for("apiary_dht_routing_table_nodes", timeout=30)  # once it has data
        prometheus.query("apiary_dht_routing_table_nodes")                 # the result vector, now

`tools()` installs Debian's `prometheus` package (as root) where it is missing and raises
NotInstallable, saying why, where it cannot be had.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import httpx
import yaml
from service_processes import free_port

from deploy.apt import NotInstallable, ensure_tools, find_tool
from deploy.files import REPO

CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
RULES = sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = sorted((REPO / "deploy" / "prometheus" / "tests").glob("*.yml"))
START_TIMEOUT_S = 60.0


def tools() -> tuple[str, str]:
    """The paths of `prometheus` and `promtool` (installed first where missing)."""
    ensure_tools({"prometheus": "prometheus", "promtool": "prometheus"})
    prometheus, promtool = find_tool("prometheus"), find_tool("promtool")
    if prometheus is None or promtool is None:
        raise NotInstallable("prometheus or promtool is still missing after installing Debian's prometheus")
    return prometheus, promtool


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tools()[1], *map(str, args)], capture_output=True, text=True, timeout=120, check=False)


def alert_rules() -> dict[str, dict[str, Any]]:
    """Every alerting rule of deploy/prometheus/rules, by alert name."""
    return {rule["alert"]: rule for path in RULES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "alert" in rule}


def adapted_config(targets: dict[str, list[str]], interval: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with each service's target replaced by its processes here
    (`targets`: service label -> [host:port, ...]), every interval set to `interval`, and the rule
    files made absolute. A service of the file missing from `targets` fails the test."""
    config = yaml.safe_load(CONFIG.read_text())
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    config["rule_files"] = [str(CONFIG.parent / pattern) for pattern in config.get("rule_files", [])]
    for job in config["scrape_configs"]:
        for group in job["static_configs"]:
            group["targets"] = targets[group["labels"]["service"]]
    return config


class PrometheusServer:
    """`prometheus` with `adapted_config(targets, interval)`, its data in `directory`; stopped on exit."""

    def __init__(self, directory: Path, targets: dict[str, list[str]], interval: str = "1s"):
        binary, _ = tools()
        config = directory / "prometheus.yml"
        config.write_text(yaml.safe_dump(adapted_config(targets, interval)))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log: IO[bytes] = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def __enter__(self) -> PrometheusServer:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"prometheus did not start: {self.output()}")
            time.sleep(0.25)
        return self

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def api(self, path: str, **params: str) -> Any:
        """The `data` of an HTTP API answer (`/api/v1/<path>`); fails the test on an error."""
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        """The result of an instant query, now."""
        return self.api("query", query=expression)["result"]

    def wait_for(self, expression: str, timeout: float) -> list[dict[str, Any]]:
        """The result of the query once it is not empty; fails the test after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not (result := self.query(expression)):
            assert time.monotonic() < deadline, f"no data for {expression!r} in {timeout:.0f} s"
            time.sleep(0.5)
        return result

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()

    def __exit__(self, *exc: object) -> None:
        self.close()

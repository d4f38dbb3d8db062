"""The monitor's page in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`, installed with apt-get where missing) driven by selenium.

A real swarm (two participants' dht, averager and trainer, and an expert server: the swarm of
test_monitoring_dashboards) is watched by `apiary monitor`; the page, once its script has read
live data, shows the swarm's peer count, the run's epoch, the expert grid and the run's
throughput as a plotted series. A screenshot is kept as a test artifact
(`$APIARY_TEST_ARTIFACTS`, default build/test-artifacts/; docs/monitor.png is one of them).
A crowd of 200 peers, each record signed by its own DHT node, still loads and renders in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_processes import ServiceProcesses
from test_monitoring_dashboards import EXPERTS, RUN, Swarm

from apiary.moe.names import expand_expert_names
from deploy.apt import NotInstallable, ensure_tools, find_tool

ARTIFACTS = Path(os.environ.get("APIARY_TEST_ARTIFACTS", Path(__file__).parent.parent / "build" / "test-artifacts"))
CROWD = 200
WAIT_S = 90.0
RENDER_S = 5.0  # a loaded page shows the crowd within this


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium through chromedriver (skipped, saying why, where it cannot be had)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the test extras) is not installed")
    try:
        ensure_tools({"chromium": "chromium", "chromedriver": "chromium-driver"})
    except NotInstallable as e:
        pytest.skip(f"Debian's chromium and chromium-driver cannot be had: {e}")
    options = webdriver.ChromeOptions()
    options.binary_location = find_tool("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1800", "--hide-scrollbars"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=find_tool("chromedriver")))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(what: str, check: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f}s"
        time.sleep(0.25)


def shown(driver: Any, script: str) -> Any:
    return driver.execute_script(script)


PEER_COUNT = "const e = document.getElementById('peer-count'); return e ? parseInt(e.textContent, 10) : null;"


def run_section(run: str) -> str:
    return f"document.querySelector('.run[data-run=\"{run}\"]')"


@pytest.mark.timeout(400)
def test_the_page_shows_the_live_swarm(browser: Any) -> None:
    with ServiceProcesses() as processes:
        swarm = Swarm(processes)
        monitor = processes.start("monitor", "--initial-peers", swarm.dhts[0].initial_peers, "--refresh", "1",
                                  host_flag="--admin-host").wait_until_up(until="monitor: ")
        browser.get(f"{monitor.admin}/")
        assert browser.title == "apiary monitor"
        # live data: the script has swapped in fresh readings with every peer and a few points of the run
        wait_until("every peer and a plotted run", lambda: shown(browser, PEER_COUNT) == 7 and shown(
            browser, f"const p = window.apiaryPlots && window.apiaryPlots['{RUN}']; "
                     "return p ? p.samples_per_second.filter(v => v > 0).length >= 3 : false;"))
        assert int(shown(browser, "return parseInt(document.body.dataset.updates, 10);")) >= 1
        kinds = shown(browser, "return [...document.querySelectorAll('table.peers tbody tr td:nth-child(2)')]"
                               ".map(td => td.textContent);")
        assert sorted(kinds) == sorted(kind for kind, started in swarm.services().items() for _ in started)

        # the run's epoch is the trainers' swarm epoch (read at about the same time)
        def epochs() -> tuple[int, set[int]]:
            epoch = shown(browser, f"return parseInt({run_section(RUN)}.querySelector('.epoch').textContent, 10);")
            return epoch, {t.status()["swarm_epoch"] for t in swarm.trainers}

        wait_until("the page's epoch to be the trainers'", lambda: (lambda e: e[1] == {e[0]})(epochs()))

        # the expert grid: every expert, declared by the expert server
        server = swarm.experts.status()["peer_id"]
        grid = wait_until("the expert grid", lambda: shown(
            browser, "return [...document.querySelectorAll('table.grid .expert.declared')]"
                     ".map(e => [e.dataset.name, e.title]);"))
        assert sorted(name for name, _ in grid) == sorted(expand_expert_names(EXPERTS))
        assert all(f"@ {server}@" in title for _, title in grid)

        # the plotted series is the run's throughput the API serves, drawn on a canvas
        plotted = shown(browser, f"return window.apiaryPlots['{RUN}'].samples_per_second;")
        series = [p["samples_per_second"] for p in httpx.get(f"{monitor.admin}/api/runs", timeout=10).json()["runs"][0]["history"]]
        assert plotted == series[:len(plotted)] and len(plotted) >= 3
        assert shown(browser, f"return {run_section(RUN)}.querySelector('.plot canvas').width;") > 0
        wait_until("the trainers' loss plotted", lambda: shown(
            browser, f"return window.apiaryPlots['{RUN}'].loss.some(v => v !== null);"))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "monitor.png"))


@pytest.mark.timeout(300)
def test_a_crowd_of_200_peers_loads_and_renders_in_seconds(browser: Any) -> None:
    with ServiceProcesses() as processes:
        dht = processes.start("dht", "--new-swarm", "--plaintext").wait_until_up()
        crowd = subprocess.Popen([sys.executable, str(Path(__file__).parent / "monitor_crowd_worker.py"),
                                  dht.initial_peers, str(CROWD), "crowd"], stdout=subprocess.PIPE, text=True)
        try:
            line = crowd.stdout.readline() if crowd.stdout is not None else ""
            assert line.strip() == f"published {CROWD}", line
            monitor = processes.start("monitor", "--dht-local", str(dht.local_api), "--refresh", "2",
                                      host_flag="--admin-host").wait_until_up(until="monitor: ")
            wait_until("the monitor's first reading", lambda: httpx.get(f"{monitor.admin}/readyz", timeout=5).is_success)
            started = time.monotonic()
            browser.get(f"{monitor.admin}/")
            wait_until("the crowd on the page", lambda: shown(browser, PEER_COUNT) == CROWD + 1 and shown(
                browser, f"return {run_section('crowd')} !== null && document.body.dataset.updates !== undefined;"),
                timeout=RENDER_S)
            elapsed = time.monotonic() - started
            rows = shown(browser, "return document.querySelectorAll('table.peers tbody tr').length;")
            leaders = shown(browser, f"return {run_section('crowd')}.querySelectorAll('.leaderboard tbody tr').length;")
            assert rows == CROWD + 1 and leaders == CROWD // 4
            assert elapsed < RENDER_S, f"{elapsed:.1f}s to render {CROWD} peers"
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "monitor-crowd.png"))
        finally:
            crowd.kill()
            crowd.wait(10)

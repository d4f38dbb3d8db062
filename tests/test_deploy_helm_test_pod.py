"""`helm test`: the chart's test pod (files/helm_test.py, as the chart ships it in the pod's command)
rendered and valid, naming every service's admin endpoint; run against a real `apiary dht`
process (ready, joined) and refusing what is not there (a service that does not answer, no
successful averaging round); its round count read from the averager's real metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import kubernetes_validate
from prometheus_client import CollectorRegistry, generate_latest

from apiary.services.averager import AveragerMetrics
from deploy.helm import KUBE_VERSION, find, pod_specs, render, values_of
from service_processes import ServiceProcesses, free_port


def rendered_test_pod() -> dict:
    pod = find(render(values_of("gpu")), "Pod", "-test")
    kubernetes_validate.validate(pod, KUBE_VERSION.lstrip("v"), strict=True)
    return pod


def run_checks(pod: dict, **env: str) -> subprocess.CompletedProcess:
    spec = pod["spec"]["containers"][0]
    command = [sys.executable, *spec["command"][1:]]
    rendered = {e["name"]: e["value"] for e in spec["env"]}
    return subprocess.run(command, env={"PATH": os.environ["PATH"], **rendered, "PERIOD": "0.2", **env},
                          capture_output=True, text=True, timeout=120)


def test_the_test_pod_is_a_hook_checking_every_services_admin_endpoint() -> None:
    manifests = render(values_of("gpu"))
    pod = rendered_test_pod()
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["automountServiceAccountToken"] is False and pod["spec"]["securityContext"]["runAsNonRoot"]
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    expected = set()
    for workload, spec in pod_specs(manifests):
        name = workload["metadata"]["name"]
        for container in spec["containers"]:
            admin = [p["containerPort"] for p in container.get("ports", []) if p["name"].endswith("admin")]
            if admin and container["name"] != "redis":
                expected |= {f"http://{name}-{n}.{workload['spec']['serviceName']}.swarm.svc:{admin[0]}"
                             for n in range(workload["spec"]["replicas"])}
    assert set(json.loads(env["READY"])) == expected  # 3 dht, 2 expert servers, 2 trainers and their averagers
    assert len(json.loads(env["DHT"])) == 3 and len(json.loads(env["AVERAGERS"])) == 2
    assert env["EXPECT_NEIGHBOURS"] == "true"  # three DHT pods know each other
    assert {"app.kubernetes.io/name": "apiary", "app.kubernetes.io/instance": "demo"}.items() <= \
        pod["metadata"]["labels"].items()  # admitted to the admin ports by the NetworkPolicies
    assert not [m for m in render({"helmTest": {"enabled": False}}) if m["kind"] == "Pod"]


def test_the_checks_pass_against_a_real_dht_and_name_what_is_missing() -> None:
    pod = rendered_test_pod()
    with ServiceProcesses() as services:
        dht = services.start("dht", "--new-swarm", "--plaintext").wait_until_up()
        passed = run_checks(pod, READY=json.dumps([dht.admin]), DHT=json.dumps([dht.admin]), EXPECT_NEIGHBOURS="false",
                            AVERAGERS="[]", TIMEOUT="60")
        assert passed.returncode == 0 and "every check passed" in passed.stdout, passed.stdout + passed.stderr
        assert f"ok: the DHT at {dht.admin} joined the swarm" in passed.stdout
        silent = f"http://127.0.0.1:{free_port()}"
        missing = run_checks(pod, READY=json.dumps([dht.admin, silent]), TIMEOUT="2")
        assert missing.returncode != 0 and f"FAILED: {silent} is ready" in missing.stderr
        alone = run_checks(pod, READY="[]", DHT=json.dumps([dht.admin]), EXPECT_NEIGHBOURS="true", TIMEOUT="2")
        assert alone.returncode != 0 and "neighbours=0" in alone.stderr  # a DHT that joined nobody
        no_round = run_checks(pod, READY="[]", DHT="[]", AVERAGERS=json.dumps([dht.admin]), TIMEOUT="2")
        assert no_round.returncode != 0 and "FAILED: an averaging round succeeded" in no_round.stderr


def test_the_round_check_reads_the_averagers_own_metric() -> None:
    namespace: dict = {"__name__": "helm_test"}
    exec(compile(rendered_test_pod()["spec"]["containers"][0]["command"][2], "helm_test.py", "exec"), namespace)
    registry = CollectorRegistry()
    metrics = AveragerMetrics(registry)
    metrics.rounds.labels(result="no_group").inc()
    assert not namespace["rounds_in"](generate_latest(registry).decode())
    metrics.rounds.labels(result="ok").inc(2)
    assert namespace["rounds_in"](generate_latest(registry).decode()) == 2

"""The chart's security objects, offline: Redis behind a password with protected mode on (the
rendered command run with a real redis-server, reached with the URL the DHT pod's script forms),
and NetworkPolicies that let other participants reach the public ports alone."""

from __future__ import annotations

import base64
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from deploy.helm import container, env_of, find, pod_specs, render, start_as_pod, values_of
from redis_server import free_port
from tools.ensure_redis import find_redis_server

RELEASE = {"app.kubernetes.io/name": "apiary", "app.kubernetes.io/instance": "demo"}


def test_redis_requires_a_generated_password_or_the_one_of_an_existing_secret() -> None:
    manifests = render(None)
    secret = find(manifests, "Secret", "-redis")
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{32}", password)
    redis_pod = find(manifests, "StatefulSet", "-redis")["spec"]["template"]["spec"]
    server = container(redis_pod, "redis")
    assert "--protected-mode yes" in server["args"][0] and "protected-mode no" not in str(server)
    assert password not in str(manifests[1:])  # only in the Secret
    assert env_of(server)["REDISCLI_AUTH"] == {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "password"}}
    dht = container(find(manifests, "StatefulSet", "-dht")["spec"]["template"]["spec"], "dht")
    assert env_of(dht)["REDIS_PASSWORD"] == env_of(server)["REDISCLI_AUTH"]

    own = render({"redis": {"auth": {"existingSecret": "team-redis"}}})
    assert not [m for m in own if m["kind"] == "Secret"]
    for name, workload in (("redis", "-redis"), ("dht", "-dht")):
        spec = container(find(own, "StatefulSet", workload)["spec"]["template"]["spec"], name)
        assert {"name": "team-redis", "key": "password"} in [e.get("valueFrom", {}).get("secretKeyRef") for e in spec["env"]]


@pytest.mark.skipif(find_redis_server() is None, reason="redis-server is not installed (python -m tests.tools.ensure_redis)")
def test_the_rendered_redis_refuses_strangers_and_serves_the_dht_pod_with_its_password(tmp_path: Path) -> None:
    manifests = render(None)
    password = base64.b64decode(find(manifests, "Secret", "-redis")["data"]["password"]).decode()
    server = container(find(manifests, "StatefulSet", "-redis")["spec"]["template"]["spec"], "redis")
    port = free_port()
    script = server["args"][0].replace("--dir /data", f"--dir {tmp_path} --port {port} --bind 127.0.0.1")
    process = subprocess.Popen(["/bin/sh", "-c", script], env={"REDISCLI_AUTH": password, "PATH": "/usr/bin:/bin"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert ask(port, b"PING").startswith(b"-NOAUTH")  # no password, no service
        # The DHT pod 1's URL: Kubernetes fills in $(REDIS_PASSWORD), the pod's script adds its database.
        dht = container(find(manifests, "StatefulSet", "-dht")["spec"]["template"]["spec"], "dht")
        base = env_of(dht)["REDIS_BASE_URL"].replace("$(REDIS_PASSWORD)", password)
        base = base.replace("demo-apiary-redis:6379", f"127.0.0.1:{port}")
        dht = {**dht, "env": [e for e in dht["env"] if e["name"] != "REDIS_BASE_URL"]
               + [{"name": "REDIS_BASE_URL", "value": base}]}
        url = start_as_pod(dht, "demo-apiary-dht-1", tmp_path / "pod")["env"]["APIARY_REDIS_URL"]
        client = redis.Redis.from_url(url, socket_timeout=5)
        assert client.ping() and client.connection_pool.connection_kwargs["db"] == 1
        client.close()
    finally:
        process.terminate()
        process.wait(timeout=10)


def ask(port: int, command: bytes, timeout: float = 10.0) -> bytes:
    """One inline command to Redis on 127.0.0.1:port, once it listens; its reply line."""
    give_up = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
                connection.sendall(command + b"\r\n")
                return connection.recv(1024)
        except ConnectionRefusedError:
            if time.monotonic() > give_up:
                raise
            time.sleep(0.05)


def allowed(manifests: list[dict], target: dict[str, str], port: str, source: dict[str, str] | None,
            namespace: str = "swarm") -> bool:
    """Whether NetworkPolicies let a pod labelled `source` (in `namespace`; None: outside the cluster)
    connect to the named port of a pod labelled `target` in the release's namespace."""
    policies = [p for p in manifests if p["kind"] == "NetworkPolicy"
                and p["spec"]["podSelector"]["matchLabels"].items() <= target.items()]
    if not policies:
        return True  # not isolated
    for policy in policies:
        for rule in policy["spec"]["ingress"]:
            if port not in [p["port"] for p in rule.get("ports", [])]:
                continue
            if "from" not in rule:
                return True
            for peer in rule["from"]:
                if source is None:
                    continue
                pods = peer.get("podSelector", {}).get("matchLabels", {})
                namespaces = peer.get("namespaceSelector", {}).get("matchLabels")
                in_namespace = (namespace == "swarm") if namespaces is None else \
                    namespaces.items() <= {"kubernetes.io/metadata.name": namespace}.items()
                if in_namespace and pods.items() <= source.items():
                    return True
    return False


def labels(component: str) -> dict[str, str]:
    return {**RELEASE, "app.kubernetes.io/component": component}


def test_network_policies_open_the_public_ports_and_keep_local_apis_to_the_participants_own_pods() -> None:
    manifests = render(values_of("monitoring"))
    policies = {p["metadata"]["name"] for p in manifests if p["kind"] == "NetworkPolicy"}
    isolated = {w["metadata"]["name"] for w, _ in pod_specs(manifests)}
    assert policies == isolated  # every workload (Redis is external here)
    public = {"dht": ["dht"], "expert-server": ["experts"], "trainer": ["averager", "bulk"]}
    local = {"dht": ["local", "admin"], "expert-server": ["admin"], "trainer": ["admin", "averager-admin"],
             "monitor": ["admin"]}
    another_release = {"app.kubernetes.io/name": "apiary", "app.kubernetes.io/instance": "other"}
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    for component, ports in public.items():
        for port in ports:
            assert allowed(manifests, labels(component), port, None)  # other participants, from the internet
    for component, ports in local.items():
        for port in ports:
            assert allowed(manifests, labels(component), port, labels("trainer"))
            assert not allowed(manifests, labels(component), port, None)
            assert not allowed(manifests, labels(component), port, another_release)
            assert allowed(manifests, labels(component), port, prometheus, "monitoring") == port.endswith("admin")
            assert not allowed(manifests, labels(component), port, prometheus, "default")


def test_redis_takes_connections_from_the_dht_pods_alone() -> None:
    manifests = render(None)
    assert allowed(manifests, labels("redis"), "redis", labels("dht"))
    for source in (labels("trainer"), labels("expert-server"), {"app": "anything"}, None):
        assert not allowed(manifests, labels("redis"), "redis", source)
    assert not [p for p in render({"networkPolicy": {"enabled": False}}) if p["kind"] == "NetworkPolicy"]

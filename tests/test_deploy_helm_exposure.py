"""How the chart exposes each pod to other participants (exposure.mode), offline: a Service per pod
for LoadBalancer and NodePort, the nodes' network, relayed, pod addresses; and the announce init
container's script (files/announce.py, as the chart ships it in its ConfigMap) run against a
stand-in for the Kubernetes API over HTTPS, its result handed to the service's own start script."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from deploy.helm import CHART, container, env_of, find, pod_specs, render, start_as_pod, values_of

PUBLIC_PORTS = {"dht": ["dht"], "expert-server": ["experts"], "trainer": ["averager", "bulk"]}
PUBLIC_CONTAINERS = {"dht", "expert-server", "averager"}
TOKEN = "the-service-account-token"


def per_pod_services(manifests: list[dict]) -> dict[str, dict]:
    return {m["metadata"]["name"]: m for m in manifests
            if m["kind"] == "Service" and "apiary.io/exposure" in m["metadata"]["labels"]}


def public_containers(manifests: list[dict]) -> Iterator[tuple[dict, dict, dict]]:
    for workload, pod in pod_specs(manifests):
        for spec in pod["containers"]:
            if spec["name"] in PUBLIC_CONTAINERS:
                yield workload, pod, spec


def test_the_example_values_show_every_exposure_mode() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    modes = set(schema["properties"]["exposure"]["properties"]["mode"]["enum"])
    shown = {(values_of(name).get("exposure") or {}).get("mode", "LoadBalancer")
             for name in ("cpu", "gpu", "monitoring", "private", "hostnetwork")}
    assert shown == modes == {"LoadBalancer", "NodePort", "hostNetwork", "relayed", "podIP"}


def test_load_balancer_mode_gives_each_pod_its_own_service_and_reads_its_address_with_one_role() -> None:
    values = values_of("gpu")  # 3 dht pods (relaying), 2 expert servers, 2 trainers; EKS annotations
    manifests = render(values)
    services = per_pod_services(manifests)
    expected = {f"demo-apiary-{component}-{n}" for component, replicas in
                (("dht", 3), ("expert-server", 2), ("trainer", 2)) for n in range(replicas)}
    assert set(services) == expected
    for name, service in services.items():
        component = service["metadata"]["labels"]["app.kubernetes.io/component"]
        assert service["spec"]["type"] == "LoadBalancer"
        assert service["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == name  # this pod alone
        assert service["spec"]["externalTrafficPolicy"] == "Local"  # peers' own source addresses
        assert service["spec"]["loadBalancerClass"] == "service.k8s.aws/nlb"
        assert service["metadata"]["annotations"] == values["exposure"]["loadBalancer"]["annotations"]
        names = [p["name"] for p in service["spec"]["ports"]]
        assert names == PUBLIC_PORTS[component] + (["relay"] if component == "dht" else [])
    role = find(manifests, "Role", "-announce")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["services"], "verbs": ["get"],
                              "resourceNames": sorted(services)}]  # its own Services, read only
    binding = find(manifests, "RoleBinding", "-announce")
    account = find(manifests, "ServiceAccount", "-announce")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "swarm"}]
    assert account["automountServiceAccountToken"] is False
    assert not [m for m in manifests if m["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    for workload, pod, spec in public_containers(manifests):
        assert pod["serviceAccountName"] == account["metadata"]["name"] and pod["automountServiceAccountToken"] is False
        [init] = pod["initContainers"]
        assert init["command"][2] == "loadbalancer"
        assert "announce-api" in {m["name"] for m in init["volumeMounts"]}
        assert not [m for c in pod["containers"] for m in c["volumeMounts"] if m["name"] == "announce-api"]
        assert "APIARY_ANNOUNCE_HOST" not in env_of(spec)  # from the init container's file
        assert ". /run/apiary/announce/env" in spec["args"][0], spec["name"]


def test_node_port_mode_gives_each_pod_node_ports_of_its_own_and_announces_them(tmp_path: Path) -> None:
    manifests = render({**values_of("monitoring"), "trainer": {"replicas": 2}})
    services = per_pod_services(manifests)
    node_ports = {name: {p["name"]: p["nodePort"] for p in s["spec"]["ports"]} for name, s in services.items()}
    assert node_ports == {"demo-apiary-dht-0": {"dht": 30100}, "demo-apiary-expert-server-0": {"experts": 30200},
                          "demo-apiary-trainer-0": {"averager": 30300, "bulk": 30400},
                          "demo-apiary-trainer-1": {"averager": 30301, "bulk": 30401}}
    assert all(s["spec"]["type"] == "NodePort" and s["spec"]["externalTrafficPolicy"] == "Local"
               for s in services.values())  # a node port answers on the node of its pod, whose address is announced
    role = find(manifests, "ClusterRole", "-announce")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    assert find(manifests, "ClusterRoleBinding", "-announce")["roleRef"]["name"] == role["metadata"]["name"]
    averager = container(find(manifests, "StatefulSet", "-trainer")["spec"]["template"]["spec"], "averager")
    started = start_as_pod(averager, "demo-apiary-trainer-1", tmp_path, announce="export APIARY_ANNOUNCE_HOST='198.51.100.4'\n")
    assert {k: started["env"][k] for k in ("APIARY_ANNOUNCE_HOST", "APIARY_ANNOUNCE_PORT", "APIARY_ANNOUNCE_BULK_PORT")} == {
        "APIARY_ANNOUNCE_HOST": "198.51.100.4", "APIARY_ANNOUNCE_PORT": "30301", "APIARY_ANNOUNCE_BULK_PORT": "30401"}


def test_host_network_mode_puts_the_pods_on_their_nodes_and_refuses_clashing_node_ports() -> None:
    manifests = render(values_of("hostnetwork"))
    assert not per_pod_services(manifests)
    for _, pod, _ in public_containers(manifests):
        assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
        assert pod["initContainers"][0]["command"][2] == "node"
    assert find(manifests, "ClusterRole", "-announce")["rules"][0]["resources"] == ["nodes"]
    with pytest.raises(Exception, match="are both port 9100 of the node"):
        render({"exposure": {"mode": "hostNetwork"}})  # every admin port at 9100


def test_relayed_mode_opens_nothing_and_has_every_public_service_reached_through_relays() -> None:
    manifests = render(values_of("private"))
    assert not per_pod_services(manifests)
    assert not [m for m in manifests if m["kind"] in ("ServiceAccount", "Role", "ClusterRole")]
    containers = list(public_containers(manifests))
    assert {spec["name"] for _, _, spec in containers} == PUBLIC_CONTAINERS
    for _, pod, spec in containers:
        env = env_of(spec)
        assert env["APIARY_REACHABILITY"] == "relayed" and env["APIARY_RELAYS"] == "2", spec["name"]
        assert "APIARY_ANNOUNCE_HOST" not in env and "initContainers" not in pod and "hostNetwork" not in pod
    assert env_of(containers[0][2]).get("APIARY_RELAY", "false") == "false"


def test_pod_ip_mode_announces_each_pods_address() -> None:
    manifests = render(values_of("cpu"))
    assert not per_pod_services(manifests)
    for _, pod, spec in public_containers(manifests):
        assert env_of(spec)["APIARY_ANNOUNCE_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert "initContainers" not in pod and "serviceAccountName" not in pod


# --- the announce init container against a stand-in for the Kubernetes API -------------------------------

def serve_api(tmp_path: Path, answer: Callable[[str], dict | None]) -> tuple[str, Path, ThreadingHTTPServer]:
    """An HTTPS server answering GETs with answer(path) (None: 404), and a service account directory
    (token, CA, namespace) to reach it with."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (account / "token").write_text(TOKEN)
    (account / "namespace").write_text("swarm")
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = answer(self.path) if self.headers["Authorization"] == f"Bearer {TOKEN}" else None
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(json.dumps(body or {"kind": "Status"}).encode())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(account / "ca.crt", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"https://127.0.0.1:{server.server_address[1]}", account, server


def run_announce(manifests: list[dict], pod_name: str, tmp_path: Path, api: str, account: Path,
                 node: str = "node-a") -> subprocess.CompletedProcess:
    """Runs the announce init container of `pod_name` as rendered: the ConfigMap's script, its
    arguments and env, with this test's API and service account."""
    workload = next(w for w, _ in pod_specs(manifests) if pod_name.startswith(w["metadata"]["name"] + "-"))
    [init] = workload["spec"]["template"]["spec"]["initContainers"]
    script = tmp_path / "announce.py"
    script.write_text(find(manifests, "ConfigMap", "-announce")["data"]["announce.py"])
    command = [sys.executable, str(script)] + [a.replace("/run/apiary/announce/env", str(tmp_path / "env"))
                                               for a in init["command"][2:]]
    env = {e["name"]: e["value"] for e in init["env"] if "value" in e} | {"POD_NAME": pod_name, "NODE_NAME": node}
    return subprocess.run([*command, "--api", api, "--service-account", str(account), "--period", "0.1"],
                          env=env, capture_output=True, text=True, timeout=60)


def test_a_pod_announces_its_load_balancers_address_once_the_cloud_assigns_it(tmp_path: Path) -> None:
    asked: list[str] = []

    def answer(path: str) -> dict | None:
        asked.append(path)
        if path != "/api/v1/namespaces/swarm/services/demo-apiary-trainer-1":
            return None
        ingress = [{"hostname": "k8s-swarm-trainer1-0123.elb.us-east-1.amazonaws.com"}] if len(asked) > 2 else []
        return {"metadata": {"name": "demo-apiary-trainer-1"}, "status": {"loadBalancer": {"ingress": ingress}}}

    api, account, server = serve_api(tmp_path, answer)
    try:
        manifests = render({"trainer": {"replicas": 2}})
        done = run_announce(manifests, "demo-apiary-trainer-1", tmp_path, api, account)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    assert len(asked) == 3 and "no external address yet" in done.stderr  # waited while it was pending
    averager = container(find(manifests, "StatefulSet", "-trainer")["spec"]["template"]["spec"], "averager")
    started = start_as_pod(averager, "demo-apiary-trainer-1", tmp_path / "pod", announce=(tmp_path / "env").read_text())
    assert started["env"]["APIARY_ANNOUNCE_HOST"] == "k8s-swarm-trainer1-0123.elb.us-east-1.amazonaws.com"
    assert "APIARY_ANNOUNCE_PORT" not in started["env"]  # the load balancer keeps the ports


def test_a_pod_announces_its_nodes_external_address_and_says_so_when_there_is_none(tmp_path: Path) -> None:
    nodes = {"node-a": [{"type": "InternalIP", "address": "10.0.3.7"}, {"type": "ExternalIP", "address": "198.51.100.4"}],
             "node-b": [{"type": "InternalIP", "address": "10.0.3.8"}, {"type": "Hostname", "address": "node-b"}]}

    def answer(path: str) -> dict | None:
        name = path.removeprefix("/api/v1/nodes/")
        return {"metadata": {"name": name}, "status": {"addresses": nodes[name]}} if name in nodes else None

    api, account, server = serve_api(tmp_path, answer)
    try:
        manifests = render(values_of("monitoring"))  # NodePort; dht-0's host is set in the values
        found = run_announce(manifests, "demo-apiary-expert-server-0", tmp_path, api, account, node="node-a")
        assert found.returncode == 0, found.stderr
        assert (tmp_path / "env").read_text() == "export APIARY_ANNOUNCE_HOST='198.51.100.4'\n"
        private = run_announce(manifests, "demo-apiary-expert-server-0", tmp_path, api, account, node="node-b")
        assert private.returncode != 0 and "node-b has no ExternalIP or ExternalDNS address" in private.stderr
    finally:
        server.shutdown()
    explicit = run_announce(manifests, "demo-apiary-dht-0", tmp_path, "https://127.0.0.1:1", account)  # no API asked
    assert explicit.returncode == 0, explicit.stderr
    assert (tmp_path / "env").read_text() == "export APIARY_ANNOUNCE_HOST='apiary.example.org'\n"

"""The Helm chart (deploy/helm/apiary), offline: lint, renderings with the example values (CPU
only, GPU, monitoring, a private run) validated as Kubernetes manifests, what each rendering must
contain, and no drift from the CLI, the admin endpoint and the dashboards."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
from kubernetes_validate.utils import SchemaNotFoundError

from apiary.wire.address import AddressError, PeerAddress
from apiary.wire.identity import Identity, public_key_from_peer_id
from deploy.cli import admin_routes, commands, env_vars
from deploy.files import REPO
from deploy.helm import (
    KUBE_VERSION, VALUES_FILES, apiary_command, container, env_of, find, lint, pod_specs, render, start_as_pod,
    validate_values, values_of,
)

RENDERINGS = [None, *VALUES_FILES]  # the defaults, then every ci/<name>-values.yaml
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor"),  # not in Kubernetes' own schemas
                    ("monitoring.coreos.com/v1", "PrometheusRule")}
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
APIARY_CONTAINERS = {"dht", "expert-server", "trainer", "averager"}
AUTHORITY = "uxu3btpujqu3npcmoy7j6cduwo5b7iyqge6losgthyhys4zp2b5q"  # a peer id (apiary token authority)


def test_the_example_values_cover_cpu_gpu_monitoring_and_a_private_run() -> None:
    assert {"cpu", "gpu", "monitoring", "private"} <= set(VALUES_FILES)


@pytest.mark.parametrize("values", RENDERINGS)
def test_lint_is_clean(values: str | None) -> None:
    report = lint(values_of(values))
    assert report["errors"] == [] and report["messages"] == [], report


@pytest.mark.parametrize("values", RENDERINGS)
def test_every_rendered_manifest_is_valid_kubernetes(values: str | None) -> None:
    manifests = render(values_of(values))
    validated = 0
    for manifest in manifests:
        if (manifest["apiVersion"], manifest["kind"]) in CUSTOM_RESOURCES:
            continue
        for version in ("1.25.0", KUBE_VERSION.lstrip("v")):  # the chart's oldest supported and a current one
            kubernetes_validate.validate(manifest, version, strict=True)
        validated += 1
    assert validated >= 8


def test_the_validator_refuses_a_manifest_with_an_unknown_field() -> None:
    statefulset = copy.deepcopy(find(render(None), "StatefulSet", "-dht"))
    statefulset["spec"]["template"]["spec"]["containers"][0]["gpuCount"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, "1.30.0", strict=True)
    with pytest.raises(SchemaNotFoundError):
        kubernetes_validate.validate({"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor"}, "1.30.0")


@pytest.mark.parametrize(("values", "problem"), [
    ({"expertServer": {"gpus": -1}}, "/expertServer/gpus"),
    ({"dht": {"replicaz": 2}}, "replicaz"),
    ({"run": {"task": "no colon"}}, "/run/task"),
    ({"expertServer": {"experts": "", "task": ""}}, "expertServer"),  # nothing names the experts
    ({"expertServer": {"task": "moe lm"}}, "/expertServer/task"),
    ({"exposure": {"mode": "hostIP"}}, "/exposure/mode"),
    ({"exposure": {"mode": "NodePort", "nodePort": {"dht": 8080}}}, "/exposure/nodePort/dht"),
    ({"exposure": {"mode": "NodePort"}, "dht": {"relay": True}}, "/dht/relay"),  # a relay's port is announced as is
    ({"exposure": {"mode": "relayed"}, "dht": {"relay": True}}, "/dht/relay"),
    ({"exposure": {"hosts": {"demo-apiary-dht-0": "a host; rm -rf /"}}}, "/exposure/hosts/demo-apiary-dht-0"),
    ({"trainer": {"averager": {"mode": "leader"}}}, "/trainer/averager/mode"),
    ({"run": {"initialPeers": ["not an address"]}}, "/run/initialPeers/0"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    ({"security": {"tls": "yes"}}, "/security/tls"),
    ({"security": {"runAuthority": "not-a-peer-id"}}, "/security/runAuthority"),
    ({"security": {"runAuthority": AUTHORITY}}, "/security/accessTokens/existingSecret"),  # no tokens
    ({"security": {"accessTokens": {"existingSecret": "tokens"}}}, "/security/runAuthority"),  # no authority
    ({"trainer": {"identity": {"secret": "keys"}}}, "secret"),
    ({"monitor": {"refresh": 0}}, "/monitor/refresh"),
])
def test_the_values_schema_names_what_is_wrong(values: dict, problem: str) -> None:
    with pytest.raises(helm.HelmValuesError) as refused:
        validate_values(values)
    assert problem in str(refused.value)


def test_the_monitor_is_an_optional_deployment_reading_the_dht_from_the_dht_image() -> None:
    assert not [m for m in render(None) if m["metadata"]["name"].endswith("-monitor")]
    manifests = render(values_of("monitoring"))
    monitor = container(find(manifests, "Deployment", "-monitor")["spec"]["template"]["spec"], "monitor")
    dht = container(find(manifests, "StatefulSet", "-dht")["spec"]["template"]["spec"], "dht")
    assert monitor["image"] == dht["image"] and apiary_command(monitor) == ["apiary", "monitor"]
    assert env_of(monitor)["APIARY_REFRESH"] == "5"
    service = find(manifests, "Service", "-monitor")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "admin", "port": 9100, "targetPort": "admin", "protocol": "TCP"}]


def test_the_example_values_pass_the_schema() -> None:
    for name in VALUES_FILES:
        validate_values(values_of(name))


def test_dht_nodes_are_a_statefulset_with_a_headless_service_and_stable_identities() -> None:
    manifests = render(values_of("gpu"))
    statefulset = find(manifests, "StatefulSet", "-dht")
    headless = find(manifests, "Service", "-dht-headless")
    assert statefulset["spec"]["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert statefulset["spec"]["replicas"] == 3
    pod = statefulset["spec"]["template"]["spec"]
    script = "\n".join(container(pod, "dht")["args"])
    assert f"{statefulset['metadata']['name']}-0.{headless['metadata']['name']}:31337" in script  # pods > 0 join pod 0
    assert "/etc/apiary/identity/dht-$ordinal.key" in script
    secret = next(v for v in pod["volumes"] if v["name"] == "identity")
    assert secret["secret"]["secretName"] == "apiary-dht-identities"
    claims = statefulset["spec"]["volumeClaimTemplates"]  # the data volume keeps the DHT's files
    assert [c["metadata"]["name"] for c in claims] == ["data"]


def test_without_a_secret_each_dht_pod_keeps_the_identity_it_creates_on_its_volume() -> None:
    statefulset = find(render(None), "StatefulSet", "-dht")
    mounts = container(statefulset["spec"]["template"]["spec"], "dht")["volumeMounts"]
    assert {"name": "data", "mountPath": "/var/lib/apiary"} in mounts
    assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "256Mi"


def test_gpu_workloads_request_the_one_device_each_process_uses_on_gpu_nodes() -> None:
    manifests = render(values_of("gpu"))
    for suffix, name, resource in (("-expert-server", "expert-server", "nvidia.com/mig-1g.10gb"),
                                   ("-trainer", "trainer", "nvidia.com/gpu")):
        pod = find(manifests, "StatefulSet", suffix)["spec"]["template"]["spec"]
        resources = container(pod, name)["resources"]
        assert {k: v for k, v in resources["requests"].items() if "/" in k} == {resource: 1}
        assert {k: v for k, v in resources["limits"].items() if "/" in k} == {resource: 1}
        assert pod["runtimeClassName"] == "nvidia"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    experts = find(manifests, "StatefulSet", "-expert-server")["spec"]["template"]["spec"]
    assert env_of(container(experts, "expert-server"))["APIARY_DEVICE"] == "cuda"


def test_cpu_only_values_ask_for_no_gpu() -> None:
    manifests = render(values_of("cpu"))
    assert "nvidia.com/gpu" not in json.dumps(manifests)
    for _, pod in pod_specs(manifests):
        assert "runtimeClassName" not in pod and "tolerations" not in pod
    experts = find(manifests, "StatefulSet", "-expert-server")["spec"]["template"]["spec"]
    assert env_of(container(experts, "expert-server"))["APIARY_DEVICE"] == "cpu"


def test_cpu_workloads_keep_no_gpu_runtime_class_and_an_expert_server_asks_for_one_device() -> None:
    """runtimeClassName only with GPUs: `gpus: 0` runs on clusters that have no nvidia RuntimeClass."""
    manifests = render({"expertServer": {"gpus": 0}, "trainer": {"gpus": 0}})
    for _, pod in pod_specs(manifests):
        assert "runtimeClassName" not in pod
        assert "nvidia.com/gpu" not in json.dumps(pod["containers"])
    trainer = find(manifests, "StatefulSet", "-trainer")["spec"]["template"]["spec"]
    assert env_of(container(trainer, "trainer"))["APIARY_GPUS"] == "1"  # one rank, on the CPU
    with pytest.raises(helm.HelmValuesError) as refused:
        validate_values({"expertServer": {"gpus": 2}})
    assert "/expertServer/gpus" in str(refused.value)
    for workload in ("expertServer", "trainer"):
        with pytest.raises(helm.HelmValuesError) as refused:
            validate_values({workload: {"gpuResource": "nvidia.com/mig 1g"}})
        assert f"/{workload}/gpuResource" in str(refused.value)


def test_the_default_task_is_moe_lm_whose_grid_the_expert_servers_share() -> None:
    """moe_lm by default: the trainers' task, and each expert server pod a share of its grid (the
    patterns, kind and size from the task); grid patterns of one's own replace the task's."""
    manifests = render(None)
    trainer = env_of(container(find(manifests, "StatefulSet", "-trainer")["spec"]["template"]["spec"], "trainer"))
    experts = env_of(container(find(manifests, "StatefulSet", "-expert-server")["spec"]["template"]["spec"],
                               "expert-server"))
    assert trainer["APIARY_TASK"] == experts["APIARY_TASK"] == "moe_lm" and experts["APIARY_NUM_EXPERTS"] == "8"
    assert not {"APIARY_EXPERTS", "APIARY_KIND", "APIARY_HIDDEN_SIZE"} & set(experts)  # the task's
    own = {"expertServer": {"task": "", "experts": "ffn.0.[0:4]", "numExperts": 0, "kind": "ffn", "hiddenSize": 64}}
    experts = env_of(container(find(render(own), "StatefulSet", "-expert-server")["spec"]["template"]["spec"],
                               "expert-server"))
    assert (experts["APIARY_EXPERTS"], experts["APIARY_KIND"], experts["APIARY_HIDDEN_SIZE"]) == ("ffn.0.[0:4]", "ffn", "64")
    assert not {"APIARY_TASK", "APIARY_NUM_EXPERTS"} & set(experts)


def test_a_trainer_pod_with_several_gpus_runs_one_rank_per_gpu() -> None:
    pod = find(render({**values_of("gpu"), "trainer": {**values_of("gpu")["trainer"], "gpus": 4}}),
               "StatefulSet", "-trainer")["spec"]["template"]["spec"]
    trainer = container(pod, "trainer")
    assert trainer["resources"]["requests"]["nvidia.com/gpu"] == 4 and trainer["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert env_of(trainer)["APIARY_GPUS"] == "4" and env_of(trainer)["APIARY_DEVICE"] == "cuda"
    assert pod["runtimeClassName"] == "nvidia"


def test_the_averager_runs_beside_each_trainer_sharing_a_memory_backed_dev_shm() -> None:
    pod = find(render(values_of("gpu")), "StatefulSet", "-trainer")["spec"]["template"]["spec"]
    assert {c["name"] for c in pod["containers"]} == {"trainer", "averager"}
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    for name in ("trainer", "averager"):
        assert {"name": "shm", "mountPath": "/dev/shm"} in container(pod, name)["volumeMounts"]
    trainer, averager = env_of(container(pod, "trainer")), env_of(container(pod, "averager"))
    assert trainer["APIARY_AVERAGER_LOCAL"] == f"127.0.0.1:{averager['APIARY_LOCAL_PORT']}"
    assert averager["APIARY_LOCAL_HOST"] == "127.0.0.1"  # the trainer's API stays inside the pod
    assert trainer["APIARY_ADMIN_PORT"] != averager["APIARY_ADMIN_PORT"]


@pytest.mark.parametrize("values", RENDERINGS)
def test_services_reach_their_dht_through_its_local_service(values: str | None) -> None:
    manifests = render(values_of(values))
    local = find(manifests, "Service", "-dht")
    address = f"{local['metadata']['name']}:{local['spec']['ports'][0]['port']}"
    for workload, pod in pod_specs(manifests):
        for spec in pod["containers"]:
            if "APIARY_DHT_LOCAL" in env_of(spec):
                assert env_of(spec)["APIARY_DHT_LOCAL"] == address, workload["metadata"]["name"]


@pytest.mark.parametrize("values", RENDERINGS)
def test_every_pod_runs_as_non_root_with_probes_on_its_admin_endpoint(values: str | None) -> None:
    routes = admin_routes()
    for workload, pod in pod_specs(render(values_of(values))):
        assert pod["securityContext"]["runAsNonRoot"] is True, workload["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False
        for spec in pod["containers"]:
            assert spec["securityContext"]["allowPrivilegeEscalation"] is False
            assert spec["securityContext"]["capabilities"]["drop"] == ["ALL"]
            if apiary_command(spec) is None:
                continue  # Redis
            admin = next(p for p in spec["ports"] if p["name"].endswith("admin"))
            assert env_of(spec)["APIARY_ADMIN_PORT"] == str(admin["containerPort"])
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
                assert spec[probe]["httpGet"] == {"path": path, "port": admin["name"]}
                assert path in routes


@pytest.mark.parametrize("values", RENDERINGS)
def test_every_container_runs_an_apiary_command_with_settings_it_reads(values: str | None) -> None:
    """No drift between the chart and the CLI: each container runs `apiary <command>` of the
    real typer app and sets only APIARY_* variables that command reads."""
    for _, pod in pod_specs(render(values_of(values))):
        for spec in pod["containers"]:
            command = apiary_command(spec)
            if command is None:
                continue
            assert command[0] == "apiary" and command[1] == spec["name"] and len(command) == 2
            assert command[1] in commands(), f"`apiary {command[1]}` is not a CLI command"
            unknown = {name for name in env_of(spec) if name.startswith("APIARY_")} - env_vars(command[1])
            assert not unknown, f"apiary {command[1]} reads no {sorted(unknown)}"


def test_redis_is_optional() -> None:
    with_redis = render(None)
    dht = find(with_redis, "StatefulSet", "-dht")["spec"]["template"]["spec"]
    redis_service = find(with_redis, "Service", "-redis")["metadata"]["name"]
    assert env_of(container(dht, "dht"))["REDIS_BASE_URL"] == f"redis://:$(REDIS_PASSWORD)@{redis_service}:6379"

    external = render(values_of("monitoring"))
    assert not [m for m in external if m["metadata"]["name"].endswith("-redis")]
    dht = find(external, "StatefulSet", "-dht")["spec"]["template"]["spec"]
    assert env_of(container(dht, "dht"))["REDIS_BASE_URL"] == "redis://redis.example.org:6379"
    assert 'APIARY_REDIS_URL="$REDIS_BASE_URL/$ordinal"' in container(dht, "dht")["args"][0]


def test_the_service_monitor_scrapes_every_admin_port() -> None:
    manifests = render(values_of("monitoring"))
    monitor = find(manifests, "ServiceMonitor", "")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in manifests if s["kind"] == "Service"
                and selector.items() <= s["metadata"]["labels"].items()]
    scraped = {e["port"] for e in monitor["spec"]["endpoints"]}
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    admin_ports = {(workload["metadata"]["labels"]["app.kubernetes.io/component"], p["name"])
                   for workload, pod in pod_specs(manifests) for spec in pod["containers"]
                   for p in spec["ports"] if p["name"].endswith("admin")}
    covered = {(s["metadata"]["labels"]["app.kubernetes.io/component"], p["name"])
               for s in selected for p in s["spec"]["ports"] if p["name"] in scraped}
    assert admin_ports == covered  # dht, expert-server, trainer and averager


def test_dashboards_ship_as_configmaps_for_the_grafana_sidecar() -> None:
    manifests = render(values_of("monitoring"))
    configmaps = [m for m in manifests if m["kind"] == "ConfigMap" and m["metadata"]["name"].endswith("-dashboard")]
    shipped = {name: json.loads(text) for m in configmaps for name, text in m["data"].items()}
    assert all(m["metadata"]["labels"]["grafana_dashboard"] == "1" for m in configmaps)
    assert shipped == {path.name: json.loads(path.read_text()) for path in DASHBOARDS.glob("*.json")}
    assert not [m for m in render(None) if m["kind"] == "ServiceMonitor" or m["metadata"]["name"].endswith("-dashboard")]


@pytest.mark.parametrize("values", RENDERINGS)
def test_every_workload_has_a_disruption_budget(values: str | None) -> None:
    manifests = render(values_of(values))
    budgets = [m["spec"]["selector"]["matchLabels"] for m in manifests if m["kind"] == "PodDisruptionBudget"]
    for workload, _ in pod_specs(manifests):
        if workload["metadata"]["labels"]["app.kubernetes.io/component"] == "redis":
            continue
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert [b for b in budgets if b.items() <= labels.items()], workload["metadata"]["name"]


def apiary_containers(manifests: list[dict]) -> list[tuple[dict, dict, dict]]:
    """(workload, pod spec, container) of every container that runs an apiary service."""
    return [(workload, pod, spec) for workload, pod in pod_specs(manifests) for spec in pod["containers"]
            if apiary_command(spec) is not None]


def test_every_apiary_container_speaks_tls_by_default_and_plaintext_only_when_asked() -> None:
    containers = apiary_containers(render(None))
    assert {spec["name"] for _, _, spec in containers} == APIARY_CONTAINERS
    for _, pod, spec in containers:
        env = env_of(spec)
        assert env["APIARY_TLS"] == "true", spec["name"]
        assert "APIARY_RUN_AUTHORITY" not in env and "APIARY_ACCESS_TOKEN" not in env  # an open run
        assert "access-tokens" not in {v["name"] for v in pod["volumes"]}
    plaintext = apiary_containers(render({"security": {"tls": False}}))
    assert {spec["name"]: env_of(spec)["APIARY_TLS"] for _, _, spec in plaintext} == dict.fromkeys(
        APIARY_CONTAINERS, "false")


def test_in_a_private_run_every_container_has_the_authority_and_its_own_identity_and_token(tmp_path: Path) -> None:
    """Each identity its own token: pod <workload>-<n> hands `apiary <service>` the key
    <service>-<n>.key and the token <service>-<n>.token from the Secrets it mounts."""
    values = values_of("private")
    security = values["security"]
    containers = apiary_containers(render(values))
    assert {spec["name"] for _, _, spec in containers} == APIARY_CONTAINERS
    for workload, pod, spec in containers:
        service = spec["name"]
        assert env_of(spec)["APIARY_RUN_AUTHORITY"] == security["runAuthority"]
        assert env_of(spec)["APIARY_TLS"] == "true"
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m for m in spec["volumeMounts"]}
        assert volumes["access-tokens"]["secret"]["secretName"] == security["accessTokens"]["existingSecret"]
        assert mounts["access-tokens"] == {"name": "access-tokens", "mountPath": "/etc/apiary/access-tokens",
                                           "readOnly": True}
        assert volumes["identity"]["secret"]["secretName"] == "apiary-identities"
        assert mounts["identity"]["mountPath"] == "/etc/apiary/identity" and mounts["identity"]["readOnly"] is True
        for ordinal in (0, 1):
            started = start_as_pod(spec, f"{workload['metadata']['name']}-{ordinal}", tmp_path / service)
            assert started["argv"] == ["apiary", service]
            assert started["env"]["APIARY_ACCESS_TOKEN"] == f"/etc/apiary/access-tokens/{service}-{ordinal}.token"
            assert started["env"]["APIARY_IDENTITY"] == f"/etc/apiary/identity/{service}-{ordinal}.key"
            assert set(started["env"]) <= env_vars(service), f"apiary {service} reads no {set(started['env']) - env_vars(service)}"


def test_tokens_without_identity_secrets_name_the_keys_each_pod_makes_itself(tmp_path: Path) -> None:
    """Tokens alone: each pod keeps the key it made on its volume (the image's APIARY_IDENTITY)
    and reads the token of its ordinal."""
    values = {"security": {"runAuthority": AUTHORITY, "accessTokens": {"existingSecret": "tokens"}}}
    for workload, pod, spec in apiary_containers(render(values)):
        started = start_as_pod(spec, f"{workload['metadata']['name']}-2", tmp_path / spec["name"])
        assert started["env"]["APIARY_ACCESS_TOKEN"] == f"/etc/apiary/access-tokens/{spec['name']}-2.token"
        assert "APIARY_IDENTITY" not in started["env"]
        assert "identity" not in {v["name"] for v in pod["volumes"]}


def test_the_dht_relays_for_peers_behind_nat_when_asked() -> None:
    plain = find(render(None), "StatefulSet", "-dht")["spec"]["template"]["spec"]
    assert env_of(container(plain, "dht"))["APIARY_RELAY"] == "false"
    assert [p["name"] for p in container(plain, "dht")["ports"]] == ["dht", "local", "admin"]
    relaying = find(render({"dht": {"relay": True, "reachability": "public"}}), "StatefulSet", "-dht")
    dht = container(relaying["spec"]["template"]["spec"], "dht")
    env = env_of(dht)
    assert env["APIARY_RELAY"] == "true" and env["APIARY_RELAY_PORT"] == "31341" and env["APIARY_REACHABILITY"] == "public"
    assert {"name": "relay", "containerPort": 31341, "protocol": "TCP"} in dht["ports"]
    exposed = find(render({"dht": {"relay": True}}), "Service", "-dht-0")  # published like the public port
    assert [(p["name"], p["port"]) for p in exposed["spec"]["ports"]] == [("dht", 31337), ("relay", 31341)]


def peer_ids_in(values: dict) -> list[str]:
    """Every peer id a values file names: its initial peers' and its run authority."""
    peers = [PeerAddress.parse(address).peer_id for address in values.get("run", {}).get("initialPeers", [])]
    return [p for p in peers if p] + [p for p in [values.get("security", {}).get("runAuthority")] if p]


@pytest.mark.parametrize("values", sorted(VALUES_FILES))
def test_every_peer_id_in_the_example_values_is_one_the_services_accept(values: str) -> None:
    for peer_id in peer_ids_in(values_of(values)):
        public_key_from_peer_id(peer_id)  # raises for what `apiary` would refuse at start


def test_the_schemas_peer_ids_are_those_the_code_parses() -> None:
    """The schema's pattern accepts every real peer id and refuses what PeerAddress.parse refuses."""
    for _ in range(64):
        peer_id = Identity.generate().peer_id
        relay = Identity.generate().peer_id
        for address in (f"{peer_id}@dht.example.org:31337", f"{peer_id}@[2001:db8::1]:31337",
                        f"{peer_id}@198.51.100.7:31341/via/{relay}"):
            PeerAddress.parse(address)
            validate_values({"run": {"initialPeers": [address]}, "security": {
                "runAuthority": peer_id, "accessTokens": {"existingSecret": "tokens"}}})
    real = Identity.generate().peer_id
    wrong = ["12D3KooWExamplePeer", real.upper(), real[:-1], real[:-1] + ("b" if real[-1] != "b" else "c")]
    for peer_id in wrong:
        with pytest.raises(AddressError):
            PeerAddress.parse(f"{peer_id}@dht.example.org:31337")
        with pytest.raises(helm.HelmValuesError) as refused:
            validate_values({"run": {"initialPeers": [f"{peer_id}@dht.example.org:31337"]}})
        assert "/run/initialPeers/0" in str(refused.value)
        with pytest.raises(helm.HelmValuesError) as refused:
            validate_values({"security": {"runAuthority": peer_id, "accessTokens": {"existingSecret": "tokens"}}})
        assert "/security/runAuthority" in str(refused.value)

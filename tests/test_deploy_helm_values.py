"""The chart's room for operators' needs, offline: pod annotations and labels, priority classes,
topology spread, extra env and volumes (task code), per-workload images and pull secrets, each in
the rendered pods and valid Kubernetes; and the image references the chart makes, which are those
`make images` and compose.yaml name."""

from __future__ import annotations

import re
import tomllib

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from deploy.files import REPO
from deploy.helm import CHART, KUBE_VERSION, container, env_of, find, pod_specs, render, validate_values, values_of

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
CODE = {"name": "task-code", "configMap": {"name": "my-task"}}
CODE_MOUNT = {"name": "task-code", "mountPath": "/opt/task", "readOnly": True}
SPREAD = [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway",
           "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "trainer"}}}]
HATCHES = {
    "podAnnotations": {"team.example.org/owner": "ml"},
    "podLabels": {"cost-center": "research"},
    "priorityClassName": "apiary",
    "imagePullSecrets": [{"name": "registry-credentials"}],
    "dht": {"priorityClassName": "apiary-dht", "podAnnotations": {"dht.example.org/role": "bootstrap"},
            "extraEnv": [{"name": "APIARY_BUCKET_SIZE", "value": "20"}]},
    "trainer": {"extraVolumes": [CODE], "extraVolumeMounts": [CODE_MOUNT], "topologySpreadConstraints": SPREAD,
                "podLabels": {"team": "trainers"}, "extraEnv": [{"name": "PYTHONPATH", "value": "/opt/task"}],
                "averager": {"extraVolumeMounts": [CODE_MOUNT]}},
    "monitor": {"enabled": True, "extraEnv": [{"name": "APIARY_LOG_LEVEL", "value": "debug"}]},
}


def test_escape_hatches_reach_the_pods_and_stay_valid_kubernetes() -> None:
    manifests = render(HATCHES)
    pods = {w["metadata"]["labels"]["app.kubernetes.io/component"]: (w, pod) for w, pod in pod_specs(manifests)}
    assert set(pods) == {"dht", "expert-server", "trainer", "redis", "monitor"}
    for component, (workload, pod) in pods.items():
        metadata = workload["spec"]["template"]["metadata"]
        assert metadata["annotations"]["team.example.org/owner"] == "ml", component
        assert metadata["labels"]["cost-center"] == "research"
        assert pod["priorityClassName"] == ("apiary-dht" if component == "dht" else "apiary")
        if component != "redis":
            assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    dht_workload, dht = pods["dht"]
    assert dht_workload["spec"]["template"]["metadata"]["annotations"]["dht.example.org/role"] == "bootstrap"
    assert env_of(container(dht, "dht"))["APIARY_BUCKET_SIZE"] == "20"
    trainer_workload, trainer = pods["trainer"]
    assert trainer_workload["spec"]["template"]["metadata"]["labels"]["team"] == "trainers"
    assert trainer["topologySpreadConstraints"] == SPREAD
    assert CODE in trainer["volumes"]
    for name in ("trainer", "averager"):
        assert CODE_MOUNT in container(trainer, name)["volumeMounts"]
    assert env_of(container(trainer, "trainer"))["PYTHONPATH"] == "/opt/task"
    assert env_of(container(pods["monitor"][1], "monitor"))["APIARY_LOG_LEVEL"] == "debug"
    assert "team" not in pods["dht"][0]["spec"]["template"]["metadata"]["labels"]  # a workload's own stay its own
    for manifest in manifests:
        if manifest["kind"] in ("StatefulSet", "Deployment"):
            kubernetes_validate.validate(manifest, KUBE_VERSION.lstrip("v"), strict=True)


@pytest.mark.parametrize(("values", "problem"), [
    ({"podLabels": {"app.kubernetes.io/name": "other"}}, "/podLabels"),  # the chart's selectors are its own
    ({"trainer": {"extraVolumeMounts": [{"name": "code"}]}}, "/trainer/extraVolumeMounts/0"),
    ({"dht": {"extraVolumes": [{"configMap": {"name": "x"}}]}}, "/dht/extraVolumes/0"),
    ({"expertServer": {"image": {"pullPolicy": "Sometimes"}}}, "/expertServer/image/pullPolicy"),
    ({"trainer": {"averager": {"image": {"tag": "bad tag"}}}}, "/trainer/averager/image/tag"),
    ({"trainer": {"topologySpreadConstraints": [{"maxSkew": 1}]}}, "/trainer/topologySpreadConstraints/0"),
    ({"monitor": {"podAnnotations": {"a": 1}}}, "/monitor/podAnnotations/a"),
])
def test_the_schema_checks_the_escape_hatches(values: dict, problem: str) -> None:
    with pytest.raises(helm.HelmValuesError) as refused:
        validate_values(values)
    assert problem in str(refused.value)


def images(manifests: list[dict]) -> dict[str, tuple[str, str]]:
    """container name -> (image, pull policy) of every apiary container and init container."""
    return {spec["name"]: (spec["image"], spec["imagePullPolicy"]) for _, pod in pod_specs(manifests)
            for spec in pod["containers"] + pod.get("initContainers", []) if spec["name"] != "redis"}


def compose_images() -> dict[str, str]:
    """What compose.yaml (and compose.gpu.yaml) name each image, their defaults filled in."""
    found = {}
    for name, device in (("compose.yaml", "cpu"), ("compose.gpu.yaml", "cuda")):
        for service, spec in yaml.safe_load((REPO / name).read_text())["services"].items():
            image = re.sub(r"\$\{APIARY_DEVICE:-[a-z]+\}", device, spec.get("image", ""))
            image = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", image)
            if image.startswith("apiary/"):
                found[image] = service
    return found


def test_the_chart_names_the_images_make_images_builds_with_the_packages_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == VERSION  # image.tag's default
    gpu = images(render(None))  # GPUs by default: the CUDA variants
    cpu = images(render(values_of("cpu")))
    assert gpu == {"announce": (f"apiary/dht:{VERSION}", "IfNotPresent"),
                   "dht": (f"apiary/dht:{VERSION}", "IfNotPresent"),
                   "expert-server": (f"apiary/expert-server:{VERSION}-cuda", "IfNotPresent"),
                   "trainer": (f"apiary/trainer:{VERSION}-cuda", "IfNotPresent"),
                   "averager": (f"apiary/averager:{VERSION}", "IfNotPresent")}
    assert cpu["expert-server"][0] == f"apiary/expert-server:{VERSION}-cpu"
    assert cpu["trainer"][0] == f"apiary/trainer:{VERSION}-cpu"
    named = compose_images()
    for image, _ in {**gpu, **cpu}.values():
        assert image in named, f"{image} is built by neither `make images` nor compose: {sorted(named)}"
    assert "latest" not in str(gpu) + str(cpu)


def test_a_registry_and_a_workloads_own_image_override_the_defaults() -> None:
    manifests = render({"image": {"registry": "ghcr.io/acme"},
                        "expertServer": {"image": {"repository": "acme/custom-experts", "tag": "2024-06", "pullPolicy": "Always"}},
                        "trainer": {"averager": {"image": {"registry": "registry.example.org", "tag": "patched"}}}})
    found = images(manifests)
    assert found["dht"] == (f"ghcr.io/acme/apiary/dht:{VERSION}", "IfNotPresent")
    assert found["trainer"] == (f"ghcr.io/acme/apiary/trainer:{VERSION}-cuda", "IfNotPresent")
    assert found["expert-server"] == ("ghcr.io/acme/acme/custom-experts:2024-06", "Always")
    assert found["averager"] == ("registry.example.org/apiary/averager:patched", "IfNotPresent")
    dht = find(render({"dht": {"image": {"tag": "dht-only"}}}), "StatefulSet", "-dht")["spec"]["template"]["spec"]
    assert dht["initContainers"][0]["image"] == container(dht, "dht")["image"] == f"apiary/dht:dht-only"

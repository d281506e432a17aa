"""k8s/ checked offline: schemas (Kubernetes and KubeRay's CRDs), and the manifests agree with
each other and with `tpserve serve`."""
from __future__ import annotations

import copy
import re
import shlex

import kubernetes_validate
import pytest

from tests.k8s.render import K8S_VERSION, OVERLAYS, ROOT, SCHEMAS, crd_errors, find, render


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(overlay):
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"RayCluster", "Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "NetworkPolicy"} <= kinds
    for d in docs:
        if d["apiVersion"].startswith("ray.io/"):
            assert crd_errors(d) == [], d["metadata"]["name"]
        else:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)


def test_the_crd_check_rejects_a_misspelt_field():
    ray = copy.deepcopy(find(render("cpu-dev"), "RayCluster"))
    ray["spec"]["workerGroupSpecs"][0]["rayStartParam"] = ray["spec"]["workerGroupSpecs"][0].pop("rayStartParams")
    assert any("rayStartParam" in e for e in crd_errors(ray))
    ray = copy.deepcopy(find(render("cpu-dev"), "RayCluster"))
    ray["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagee"] = "x"
    assert crd_errors(ray)


def test_the_kubernetes_check_rejects_a_misspelt_field():
    dep = copy.deepcopy(find(render("cpu-dev"), "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_known_good_kuberay_samples_pass_the_same_crd_check():
    import yaml

    checked = 0
    for sample in sorted((SCHEMAS / "samples").glob("*.yaml")):
        for doc in yaml.safe_load_all(sample.read_text()):
            if doc and doc["apiVersion"].startswith("ray.io/"):
                assert crd_errors(doc) == [], sample.name
                checked += 1
    assert checked >= 2


def frontend_command(docs) -> tuple[str, dict]:
    dep = find(docs, "Deployment", "tpserve-frontend")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    cfg = find(docs, "ConfigMap", "tpserve-config")["data"]
    return c["args"][0].replace("${SECURITY_ARGS}", cfg.get("SECURITY_ARGS", "")), cfg


def flag(cmd: str, name: str) -> str:
    words = shlex.split(cmd.replace("&&", " && "))
    return words[words.index(name) + 1]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_probes_service_and_scrape_agree_with_the_serve_command(overlay):
    docs = render(overlay)
    cmd, cfg = frontend_command(docs)
    port, metrics = int(flag(cmd, "--port")), int(flag(cmd, "--metrics-port"))
    health = int(flag(cmd, "--health-port"))
    pod = find(docs, "Deployment", "tpserve-frontend")["spec"]["template"]
    c = pod["spec"]["containers"][0]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["grpc"]["port"] == health  # plaintext, health only: works with TLS and a token on
    assert c["livenessProbe"]["grpc"]["service"] == "liveness"
    assert c["readinessProbe"]["grpc"]["service"] == cfg["SERVED_MODEL_NAME"]
    svc = find(docs, "Service", "tpserve")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    tls = "--tls-cert" in cmd
    assert ports["grpc"]["targetPort"] == port
    assert ports["grpc"]["appProtocol"] == ("https" if tls else "kubernetes.io/h2c")
    assert "health" not in ports  # probes come from the kubelet, not through the Service
    assert ports["metrics"]["targetPort"] == metrics
    assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == metrics
    assert {p["containerPort"] for p in c["ports"]} == {port, metrics, health}
    policy = find(docs, "NetworkPolicy", "tpserve-frontend")["spec"]["ingress"][0]["ports"]
    assert {p["port"] for p in policy} == {port, metrics, health}
    if tls:  # every file the flags name comes from a mounted Secret
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        secrets = {v["name"] for v in pod["spec"]["volumes"] if "secret" in v}
        for name in ("--tls-cert", "--tls-key", "--auth-token-file"):
            path = flag(cmd, name)
            assert any(path.startswith(mounts[v] + "/") for v in secrets), (name, path)
    drain = float(flag(cmd, "--drain-timeout"))
    assert pod["spec"]["terminationGracePeriodSeconds"] > drain + 5  # preStop sleep + drain fit in the grace


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_per_worker_pod_equal_the_tp_degree(overlay):
    docs = render(overlay)
    cfg = find(docs, "ConfigMap", "tpserve-config")["data"]
    tp = int(cfg["TP"])
    ray = find(docs, "RayCluster")
    head = ray["spec"]["headGroupSpec"]
    assert "nvidia.com/gpu" not in str(head["template"]["spec"]["containers"][0]["resources"])
    for group in ray["spec"]["workerGroupSpecs"]:
        res = group["template"]["spec"]["containers"][0]["resources"]
        if cfg["DEVICE"] == "cuda":
            assert int(res["limits"]["nvidia.com/gpu"]) == tp == int(group["rayStartParams"]["num-gpus"])
            assert group["template"]["spec"]["tolerations"] and group["template"]["spec"]["nodeSelector"]
        else:
            assert "nvidia.com/gpu" not in res["limits"]
            assert int(group["rayStartParams"]["num-cpus"]) >= tp  # one CPU bundle per rank
        shm = [v for v in group["template"]["spec"]["volumes"] if v["name"] == "shm"][0]
        assert shm["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_is_the_one_the_dockerfile_builds_and_pods_are_locked_down(overlay):
    image = re.search(r"^IMAGE\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    text = str(render(overlay))
    images = set(re.findall(r"'image': '([^']+)'", text))
    assert images == {image}
    for d in render(overlay):
        spec = (d.get("spec", {}).get("template", {}) or {}).get("spec")
        pods = [spec] if spec else []
        if d["kind"] == "RayCluster":
            pods = [d["spec"]["headGroupSpec"]["template"]["spec"]] + \
                   [g["template"]["spec"] for g in d["spec"]["workerGroupSpecs"]]
        for pod in pods:
            assert pod["securityContext"]["runAsNonRoot"] is True
            for c in pod["containers"] + pod.get("initContainers", []):
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
                assert sc["readOnlyRootFilesystem"] is True
                assert "requests" in c["resources"] and "limits" in c["resources"]
    ray = find(render(overlay), "RayCluster")
    assert ray["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"

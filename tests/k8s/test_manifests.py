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
    port, metrics, http = int(flag(cmd, "--port")), int(flag(cmd, "--metrics-port")), int(flag(cmd, "--http-port"))
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
    assert set(ports) == {"grpc", "http"}  # clients' ports only: metrics are scraped from the pods
    assert ports["http"]["targetPort"] == http
    assert ports["http"]["appProtocol"] == ("https" if tls else "http")
    assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == metrics
    assert flag(cmd, "--metrics-host") == "0.0.0.0"  # reachable in the pod (loopback is the default)
    assert {p["containerPort"] for p in c["ports"]} == {port, http, metrics, health}
    rules = find(docs, "NetworkPolicy", "tpserve-frontend")["spec"]["ingress"]
    open_ports = {p["port"] for r in rules if "from" not in r for p in r.get("ports", [])}
    assert open_ports == {port, http, health}
    metric_rules = [r for r in rules if any(p["port"] == metrics for p in r.get("ports", []))]
    assert metric_rules and all(r["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}] for r in metric_rules)
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


def pod_specs(docs) -> list[tuple[str, dict]]:
    """(name, pod spec) of every pod template in the rendered manifests, Ray's included."""
    pods = []
    for d in docs:
        if d["kind"] == "RayCluster":
            pods.append(("ray-head", d["spec"]["headGroupSpec"]["template"]["spec"]))
            pods += [(f"ray-{g['groupName']}", g["template"]["spec"]) for g in d["spec"]["workerGroupSpecs"]]
        elif (d.get("spec", {}).get("template", {}) or {}).get("spec"):
            pods.append((d["metadata"]["name"], d["spec"]["template"]["spec"]))
    return pods


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """The Kubernetes "restricted" Pod Security Standard (baseline included), rule by rule, plus
    our own: no service-account token is mounted (no pod here talks to the API server)."""
    bad = []
    psc = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            bad.append(key)
    for v in pod.get("volumes", []):
        kinds = {k for k, val in v.items() if k != "name" and val is not None}
        if not kinds <= RESTRICTED_VOLUMES:
            bad.append(f"volume {v['name']}: {kinds - RESTRICTED_VOLUMES}")
    if pod.get("automountServiceAccountToken") is not False:
        bad.append("automountServiceAccountToken is not false")
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            bad.append(f"{c['name']}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{c['name']}: allowPrivilegeEscalation")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{c['name']}: capabilities")
        if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            bad.append(f"{c['name']}: runAsNonRoot")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            bad.append(f"{c['name']}: runAsUser 0")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{c['name']}: seccompProfile {seccomp}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{c['name']}: hostPort")
        for key in ("procMount", "appArmorProfile"):
            if key in sc and sc[key] not in ("Default", {"type": "RuntimeDefault"}, {"type": "Localhost"}):
                bad.append(f"{c['name']}: {key}")
    return bad


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_the_restricted_pod_security_standard(overlay):
    pods = pod_specs(render(overlay))
    assert {"ray-head", "ray-replicas", "tpserve-frontend"} <= {name for name, _ in pods}
    for name, pod in pods:
        assert restricted_violations(pod) == [], name


def test_the_restricted_check_finds_what_it_forbids():
    _, pod = next(p for p in pod_specs(render("cpu-dev")) if p[0] == "tpserve-frontend")
    for mutate, expected in (
            (lambda p: p["securityContext"].pop("seccompProfile"), "seccompProfile"),
            (lambda p: p.pop("automountServiceAccountToken"), "automountServiceAccountToken"),
            (lambda p: p.update(hostNetwork=True), "hostNetwork"),
            (lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "volume h"),
            (lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
             "capabilities")):
        broken = copy.deepcopy(pod)
        mutate(broken)
        assert any(expected in v for v in restricted_violations(broken)), expected


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_token_auth_is_on_everywhere_from_one_secret(overlay):
    docs = render(overlay)
    refs = []
    for name, pod in pod_specs(docs):
        for c in pod["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", (name, c["name"])
            refs.append(env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"])
            assert "value" not in env["RAY_AUTH_TOKEN"]  # never a literal token in a manifest
    assert len(refs) == 3 and all(r == refs[0] for r in refs)  # head, workers and the frontend (a Ray Client)

"""The frontend's real command line, taken from the rendered cpu-dev manifests: only addresses
and paths are swapped for local ones, and it must give a healthy server that answers."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.api.tpserve.v1 import tpserve_pb2 as pb
from cluster.api.tpserve.v1 import tpserve_pb2_grpc as pb_grpc
from tests.k8s.render import ROOT, find, render
from tests.ray_head import start_head


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(target: str, service: str) -> bool:
    try:
        with grpc.insecure_channel(target) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                        timeout=2).status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def test_cpu_dev_frontend_command_runs_here_and_serves(tmp_path, smollm2_dir):
    docs = render("cpu-dev")
    dep = find(docs, "Deployment", "tpserve-frontend")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    script = container["args"][0]
    env = dict(find(docs, "ConfigMap", "tpserve-config")["data"])
    probe_port = container["readinessProbe"]["grpc"]["port"]
    # The Ray head the RayCluster would provide, here on loopback (room for one tp-2 replica).
    client_port = free_port()
    head = start_head(num_cpus=4, node_ip_address="127.0.0.1", include_dashboard=False,
                      ray_client_server_port=client_port, object_store_memory=128 << 20)
    port, metrics, health, http = free_port(), free_port(), free_port(), free_port()
    # Swaps: addresses (the head, the pod IP, the listening address and ports) and paths.
    script = script.replace("0.0.0.0", "127.0.0.1").replace("--port 50051", f"--port {port}") \
        .replace("--metrics-port 9090", f"--metrics-port {metrics}").replace("--http-port 8000", f"--http-port {http}") \
        .replace(f"--health-port {probe_port}", f"--health-port {health}")
    env.update(RAY_CLIENT=f"127.0.0.1:{client_port}", PYTHONPATH=str(ROOT),
               TPSERVE_CACHE_DIR=str(Path(smollm2_dir).parents[1]))
    venv_bin = str(Path(sys.executable).parent)
    proc = subprocess.Popen(["/bin/sh", "-c", script], cwd=tmp_path, start_new_session=True,
                            env={**os.environ, **env, "PATH": f"{venv_bin}:{os.environ['PATH']}"},
                            stdout=open(tmp_path / "frontend.log", "w"), stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        # Ready as the kubelet sees it: the readiness probe's service on the health port.
        while not healthy(f"127.0.0.1:{health}", container["readinessProbe"]["grpc"]["service"]):
            assert proc.poll() is None, (tmp_path / "frontend.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "frontend.log").read_text()[-3000:]
            time.sleep(0.5)
        assert healthy(f"127.0.0.1:{health}", "liveness") and healthy(target, env["SERVED_MODEL_NAME"])
        with grpc.insecure_channel(target) as ch:
            out = pb_grpc.TpserveServiceStub(ch).Complete(pb.GenerateRequest(
                prompt="The capital of France is", sampling=pb.SamplingParameters(max_tokens=4, temperature=0)),
                timeout=120)
        assert out.completion_tokens == 4 and "Paris" in out.text
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
        except ProcessLookupError:
            pass
        head.shutdown()

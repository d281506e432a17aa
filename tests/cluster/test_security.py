"""TLS, mutual TLS and bearer tokens on a real server (tiny model, real Ray, real gRPC): the right
client gets in; the wrong ones fail the handshake or get UNAUTHENTICATED; health stays open, also
on a plaintext port; tokens never reach the logs."""
from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kgrpc

from cluster.api.tpserve.v1 import tpserve_pb2 as pb
from cluster.api.tpserve.v1 import tpserve_pb2_grpc as pb_grpc
from cluster.frontend.tpserve_api import STATUS_TTL_S
from cluster.tls import client_channel
from tests.certs import make_certs
from tests.cluster.conftest import ROOT, ServeProcess, free_port
from tests.reliability import record

TOKEN = "tpserve-test-token-0123456789abcdef"
WRONG = ["tpserve-test-token-0123456789abcdeX", "short", TOKEN + "0", ""]
REQUEST = pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParameters(max_tokens=2, temperature=0))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, tiny_text_model, certs, token_file):
    health_port = free_port()
    server = ServeProcess(["--model", str(tiny_text_model), "--served-model-name", "tiny", "--ray-num-cpus", "2",
                           "--tls-cert", certs.server_cert, "--tls-key", certs.server_key,
                           "--auth-token-file", token_file, "--health-port", str(health_port)],
                          tmp_path_factory.mktemp("tls"))
    server.health_port = health_port
    yield server
    server.terminate()


def tls_channel(server, certs, ca=None, cert=None, key=None):
    return grpc.secure_channel(server.target, grpc.ssl_channel_credentials(
        open(ca or certs.ca, "rb").read(), open(key, "rb").read() if key else None,
        open(cert, "rb").read() if cert else None))


def calls(channel, metadata):
    """One call of each kind the server has: v1 unary and streaming, KServe unary and stream, reflection."""
    v1 = pb_grpc.TpserveServiceStub(channel)
    ks = kgrpc.GRPCInferenceServiceStub(channel)
    return {
        "Complete": lambda: v1.Complete(REQUEST, timeout=30, metadata=metadata),
        "Generate": lambda: list(v1.Generate(REQUEST, timeout=30, metadata=metadata)),
        "GetClusterStatus": lambda: v1.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=30, metadata=metadata),
        "ServerMetadata": lambda: ks.ServerMetadata(kpb.ServerMetadataRequest(), timeout=30, metadata=metadata),
        "ModelStreamInfer": lambda: list(ks.ModelStreamInfer(iter([kpb.ModelInferRequest(model_name="tiny")]),
                                                            timeout=30, metadata=metadata)),
        "Reflection": lambda: list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30, metadata=metadata)),
    }


def health(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def test_tls_with_the_token_gets_in(tls_server, certs):
    with tls_channel(tls_server, certs) as ch:
        for name, call in calls(ch, [("authorization", f"Bearer {TOKEN}")]).items():
            call()  # raises on any failure
        reply = pb_grpc.TpserveServiceStub(ch).Complete(REQUEST, timeout=30,
                                                        metadata=[("authorization", f"Bearer {TOKEN}")])
        assert reply.completion_tokens == 2


@pytest.mark.parametrize("token", [None, *WRONG], ids=["none", "one-char-off", "short", "longer", "empty"])
def test_a_missing_or_wrong_token_is_unauthenticated_on_every_service(tls_server, certs, token):
    metadata = [] if token is None else [("authorization", f"Bearer {token}")]
    with tls_channel(tls_server, certs) as ch:
        for name, call in calls(ch, metadata).items():
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, info.value)
            assert (token or TOKEN) not in (info.value.details() or "")
        assert health(ch) == health_pb2.HealthCheckResponse.SERVING  # probes carry no token


def test_plaintext_and_an_unknown_ca_fail_the_handshake(tls_server, certs):
    with grpc.insecure_channel(tls_server.target) as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.TpserveServiceStub(ch).Complete(REQUEST, timeout=10,
                                                   metadata=[("authorization", f"Bearer {TOKEN}")])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with tls_channel(tls_server, certs, ca=certs.rogue_ca) as ch:
        with pytest.raises(grpc.RpcError) as info:
            health(ch)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_plaintext_health_port_serves_health_and_nothing_else(tls_server):
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.health_port}") as ch:
        assert health(ch) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.TpserveServiceStub(ch).Complete(REQUEST, timeout=10,
                                                   metadata=[("authorization", f"Bearer {TOKEN}")])
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_client_cli_over_tls_with_a_token_and_no_token_in_any_log(tls_server, certs, token_file):
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "client", "--target", tls_server.target,
                          "--prompt", "Hello", "--max-tokens", "3", "--tls-ca", certs.ca,
                          "--auth-token-file", token_file], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    refused = subprocess.run([sys.executable, "-m", "cluster.cli", "client", "--target", tls_server.target,
                              "--prompt", "Hello", "--tls-ca", certs.ca], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr and "Traceback" not in refused.stderr
    log = tls_server.log_path.read_text()
    assert "refused" in log  # the refusals were logged (at info, the default level) ...
    for secret in [TOKEN, *filter(None, WRONG)]:
        assert secret not in log  # ... and no token, right or wrong, was
    record("security", {"server": "TLS + bearer token + plaintext health port",
                        "bad_tokens_tried": len(WRONG) + 1, "services_checked": 6, "tokens_in_log": 0})


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory, tiny_text_model, certs):
    server = ServeProcess(["--model", str(tiny_text_model), "--served-model-name", "tiny", "--ray-num-cpus", "2",
                           "--tls-cert", certs.server_cert, "--tls-key", certs.server_key,
                           "--tls-client-ca", certs.ca], tmp_path_factory.mktemp("mtls"))
    yield server
    server.terminate()


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(mtls_server, certs):
    with tls_channel(mtls_server, certs, cert=certs.client_cert, key=certs.client_key) as ch:
        assert pb_grpc.TpserveServiceStub(ch).Complete(REQUEST, timeout=30).completion_tokens == 2
    for cert, key in ((None, None), (certs.rogue_client_cert, certs.rogue_client_key)):
        with tls_channel(mtls_server, certs, cert=cert, key=key) as ch:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.TpserveServiceStub(ch).Complete(REQUEST, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    channel, metadata = client_channel(mtls_server.target, certs.ca, certs.client_cert, certs.client_key)
    with channel:
        assert pb_grpc.TpserveServiceStub(channel).Complete(REQUEST, timeout=30, metadata=metadata).completion_tokens == 2
    record("security", {"server": "mutual TLS", "clients_refused": 2, "clients_admitted": 2})


def test_bench_reaches_a_tls_server_with_the_token(tls_server, certs, token_file, tmp_path):
    import json

    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "--target", tls_server.target,
                          "--concurrency", "2", "--num-requests", "4", "--warmup", "0", "--workload", "fixed",
                          "--input-len", "8", "--output-len", "3", "--no-progress", "--out", str(out),
                          "--tls-ca", certs.ca, "--auth-token-file", token_file],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(out.read_text())["runs"][0]["summary"]
    assert summary["completed"] == 4 and summary["failed"] == 0, summary


def test_status_shows_no_pids_or_addresses_and_metrics_listen_on_loopback_by_default(tls_server, certs):
    import psutil

    with tls_channel(tls_server, certs) as ch:
        v1 = pb_grpc.TpserveServiceStub(ch)
        auth = [("authorization", f"Bearer {TOKEN}")]
        asked = time.monotonic()
        first = v1.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=30, metadata=auth)
        v1.Complete(REQUEST, timeout=30, metadata=auth)
        cached = v1.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=30, metadata=auth)
        within_ttl = time.monotonic() - asked < STATUS_TTL_S
        fresh = v1.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=30, metadata=auth) if not within_ttl else None
    assert first.replicas and all(len(r.workers) == 0 for r in first.replicas)  # no --expose-topology
    steps = [r.steps for r in first.replicas]
    if within_ttl:  # the replicas are not asked again (the step counter has not moved yet)
        assert [r.steps for r in cached.replicas] == steps
    else:  # a loaded machine took longer than the TTL: the answer is asked anew and has moved
        assert [r.steps for r in fresh.replicas] != steps
    listening = {c.laddr for c in psutil.Process(tls_server.proc.pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == tls_server.metrics_port}
    assert listening and {a.ip for a in listening} == {"127.0.0.1"}


def test_the_http_api_takes_the_same_tls_and_token(tls_server, certs):
    import ssl

    import httpx
    import openai

    base = f"https://127.0.0.1:{tls_server.http_port}"
    trust = ssl.create_default_context(cafile=certs.ca)

    def api(key):
        return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60,
                             http_client=httpx.Client(verify=trust))

    r = api(TOKEN).completions.create(model="tiny", prompt="Hello", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2
    for wrong in WRONG[:3]:
        with pytest.raises(openai.AuthenticationError) as info:
            api(wrong).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert info.value.status_code == 401 and wrong not in str(info.value.body)
    with httpx.Client(verify=trust) as h:
        assert h.get(base + "/v1/models").status_code == 401  # no token
        assert h.get(base + "/health").status_code == 200  # probes carry none
    with pytest.raises(httpx.HTTPError):  # plaintext to the TLS port
        httpx.get(f"http://127.0.0.1:{tls_server.http_port}/health", timeout=5)


def test_the_plaintext_health_port_takes_only_small_messages(tls_server):
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.health_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert stub.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as big:  # 5 KiB: past the port's 4 KiB limit, refused by gRPC itself
            stub.Check(health_pb2.HealthCheckRequest(service="s" * 5000), timeout=10)
        assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as long:  # under the limit, over the name bound
            stub.Check(health_pb2.HealthCheckRequest(service="s" * 300), timeout=10)
        assert long.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "service" in long.value.details()

"""The cluster through real gRPC over loopback, a real embedded Ray, SmolLM2 at tp 2 x 2 replicas."""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cluster.api.tpserve.v1 import tpserve_pb2 as pb
from tests.workers.reference import reference_greedy
from workers.engine.sampling_params import SamplingParams
from workers.launcher import start_worker_group
from workers.worker import WorkerSpec

from tests.cluster.helpers import PROMPT, greedy_request, scrape, status, stub, wait_blocks_free


def test_streaming_generate_at_tp2_equals_offline_engine_and_transformers(cluster, smollm2_reference, smollm2_dir):
    model, tok = smollm2_reference
    ids = tok(PROMPT).input_ids
    ref = reference_greedy(model, ids, 12)
    with start_worker_group(WorkerSpec(str(smollm2_dir), kv_cache_memory=16 << 20)) as offline:
        engine_ids = offline.engine.generate([ids], SamplingParams(max_tokens=12, temperature=0))[0].token_ids
    msgs = list(stub(cluster).Generate(greedy_request(), timeout=120))
    streamed = [t for m in msgs for t in m.token_ids]
    assert len(msgs) > 3  # streamed step by step, not one blob
    assert streamed == engine_ids == ref
    assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH and msgs[-1].completion_tokens == 12
    assert "".join(m.text for m in msgs) == tok.decode(ref, skip_special_tokens=True)


def test_tritonclient_infer_and_stream_infer_give_the_same_text(cluster):
    expected = stub(cluster).Complete(greedy_request(n=10), timeout=120).text
    client = triton.InferenceServerClient(url=cluster.target)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("smollm2-135m")
    assert client.get_model_config("smollm2-135m").config.model_transaction_policy.decoupled

    def inputs():
        text = triton.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
        mt = triton.InferInput("max_tokens", [1], "INT32")
        mt.set_data_from_numpy(np.array([10], dtype=np.int32))
        temp = triton.InferInput("temperature", [1], "FP32")
        temp.set_data_from_numpy(np.array([0.0], dtype=np.float32))
        return [text, mt, temp]

    result = client.infer("smollm2-135m", inputs())
    assert result.as_numpy("text_output")[0].decode() == expected

    got, done = [], threading.Event()

    def callback(result, error):
        got.append((result, error))
        if error is not None or result.get_response().parameters["triton_final_response"].bool_param:
            done.set()

    client.start_stream(callback=callback)
    client.async_stream_infer("smollm2-135m", inputs(), request_id="req-7")
    assert done.wait(120)
    client.stop_stream()
    assert all(err is None for _, err in got)
    assert len(got) > 2 and all(r.get_response().id == "req-7" for r, _ in got)
    final = got[-1][0].get_response()
    assert final.parameters["output_tokens"].int64_param == 10
    assert "".join(r.as_numpy("text_output")[0].decode() for r, _ in got) == expected


def test_sixteen_concurrent_requests_spread_over_both_replicas(cluster):
    before = {r.replica_id: r.requests_routed for r in status(cluster).replicas}
    assert len(before) == 2
    results = [None] * 16

    def run(i):
        results[i] = stub(cluster).Complete(greedy_request(f"Question {i}: what is {i} plus {i}?", n=4, ignore_eos=True),
                                          timeout=180)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None and r.completion_tokens == 4 for r in results)
    after = {r.replica_id: r.requests_routed for r in status(cluster).replicas}
    assert all(after[k] - before[k] >= 4 for k in before), (before, after)


def test_health_serving_and_reflection_lists_the_services(cluster):
    health = health_pb2_grpc.HealthStub(cluster.channel())
    for service in ("", "smollm2-135m", "liveness"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service="smollm2-135m"), timeout=10)
    assert next(iter(watch)).status == health_pb2.HealthCheckResponse.SERVING  # the streaming form, too
    watch.cancel()
    refl = reflection_pb2_grpc.ServerReflectionStub(cluster.channel())
    reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=10))
    names = {s.name for s in reply.list_services_response.service}
    assert {"tpserve.v1.TpserveService", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_cancel_and_deadline_abort_in_the_engine_and_free_blocks(cluster):
    call = stub(cluster).Generate(greedy_request(n=400, ignore_eos=True), timeout=120)
    it = iter(call)
    next(it), next(it)
    call.cancel()
    with pytest.raises(grpc.RpcError) as info:
        stub(cluster).Complete(greedy_request(n=400, ignore_eos=True), timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    st = wait_blocks_free(cluster)
    assert all(r.kv_blocks_free == r.kv_blocks_total and r.running == 0 for r in st.replicas), st


@pytest.mark.parametrize(("request_", "code", "field"), [
    (pb.GenerateRequest(prompt="", sampling=pb.SamplingParameters(max_tokens=4)), "INVALID_ARGUMENT", "prompt"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(max_tokens=4, temperature=-1)),
     "INVALID_ARGUMENT", "sampling.temperature"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(max_tokens=5000)), "INVALID_ARGUMENT", "max_tokens"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(top_p=0)), "INVALID_ARGUMENT", "sampling.top_p"),
    (pb.GenerateRequest(model="gpt-9", prompt="hi"), "NOT_FOUND", "gpt-9"),
    (pb.GenerateRequest(sampling=pb.SamplingParameters(max_tokens=4)), "INVALID_ARGUMENT", "input"),
])
def test_bad_requests_get_a_status_naming_the_field(cluster, request_, code, field):
    with pytest.raises(grpc.RpcError) as info:
        list(stub(cluster).Generate(request_, timeout=30))
    assert info.value.code().name == code and field in info.value.details()


def test_tokenize_and_model_info(cluster, smollm2_reference):
    _, tok = smollm2_reference
    s = stub(cluster)
    assert list(s.Tokenize(pb.TokenizeRequest(text=PROMPT), timeout=10).token_ids) == tok(PROMPT).input_ids
    info = s.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert (info.name, info.architecture, info.tp_size, info.vocab_size) == ("smollm2-135m", "llama", 2, 49152)
    assert info.has_chat_template
    chat = s.Complete(pb.GenerateRequest(messages=pb.ChatMessages(messages=[
        pb.ChatMessage(role="user", content="What is the capital of France?")]),
        sampling=pb.SamplingParameters(max_tokens=20, temperature=0)), timeout=120)
    assert "Paris" in chat.text and chat.finish_reason == pb.FINISH_REASON_STOP


def test_cluster_status_reports_replicas_workers_and_kv(cluster):
    st = status(cluster)
    assert len(st.replicas) == 2
    for r in st.replicas:
        assert r.state == pb.REPLICA_STATE_READY and r.tp_size == 2
        assert [w.rank for w in r.workers] == [0, 1] and all(w.pid > 0 for w in r.workers)
        assert r.kv_blocks_total > 0


def test_prometheus_metrics_count_requests_and_kv_use(cluster):
    stub(cluster).Complete(greedy_request(n=3), timeout=120)
    # No GetClusterStatus first: a Prometheus-only deployment sees the per-replica series too.
    values = scrape(cluster)
    assert values["tpserve_time_to_first_token_seconds_count"] >= 1
    assert values["tpserve_inter_token_latency_seconds_count"] >= 2
    assert values["tpserve_e2e_request_latency_seconds_count"] >= 1
    assert values["tpserve_generation_tokens_total"] >= 3
    assert sum(k.startswith("tpserve_kv_cache_usage_ratio{") for k in values) == 2
    assert sum(k.startswith("tpserve_replica_requests_in_flight{") for k in values) == 2
    assert values["tpserve_replicas_ready"] == 2
    assert "tpserve_replica_restarts_total" in values and "tpserve_requests_quarantined_total" in values


def test_client_cli_streams_the_completion(cluster):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "client", "--target", cluster.target,
                           "--prompt", "What is the capital of France?", "--chat", "--max-tokens", "20"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Paris" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "cluster.cli", "client", "--target", cluster.target,
                          "--prompt", "hi", "--temperature", "-1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "INVALID_ARGUMENT: sampling.temperature" in bad.stderr


def test_structured_outputs_through_tpserve_v1_and_kserve(cluster):
    """The same constraint through the gRPC APIs: tpserve.v1's `sampling.structured` oneof and
    KServe's `sampling_parameters` (vLLM's structured_outputs shape); a bad one is
    INVALID_ARGUMENT naming the field."""
    import json
    import re

    def request(**structured):
        return pb.GenerateRequest(prompt="The capital of France is", sampling=pb.SamplingParameters(
            max_tokens=16, temperature=0, structured=pb.StructuredOutput(**structured)))

    r = stub(cluster).Complete(request(choice=pb.ChoiceList(choices=["Paris", "Lyon"])), timeout=120)
    assert r.text in ("Paris", "Lyon") and r.finish_reason == pb.FINISH_REASON_STOP
    r = stub(cluster).Complete(request(regex="[0-9]{3}"), timeout=120)
    assert re.fullmatch("[0-9]{3}", r.text)
    for bad in (request(regex="(open"), request()):
        with pytest.raises(grpc.RpcError) as info:
            stub(cluster).Complete(bad, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.structured" in info.value.details()

    client = triton.InferenceServerClient(url=cluster.target)

    def infer(sampling: dict):
        text = triton.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"A JSON object:"], dtype=object))
        mt = triton.InferInput("max_tokens", [1], "INT32")
        mt.set_data_from_numpy(np.array([64], dtype=np.int32))
        sp = triton.InferInput("sampling_parameters", [1], "BYTES")
        sp.set_data_from_numpy(np.array([json.dumps(sampling).encode()], dtype=object))
        return client.infer("smollm2-135m", [text, mt, sp])

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    out = infer({"temperature": 0.0, "structured_outputs": {"json": schema}}).as_numpy("text_output")[0].decode()
    assert isinstance(json.loads(out)["ok"], bool)
    with pytest.raises(triton.InferenceServerException) as info:
        infer({"guided_regex": "(open"})
    assert "sampling_parameters.guided_regex" in str(info.value)

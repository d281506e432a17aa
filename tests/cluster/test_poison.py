"""No request kills a replica (the shared cluster: SmolLM2, tp 2 x 2 replicas).

A table of extreme values for every field of every API: each is refused naming its field (or,
where the value is inside the accepted range, served), no rank process is replaced, and the
server then serves a normal request. Then the dead-letter rule on a cluster of its own: a
request that takes down every replica it reaches costs two replicas, not four.
"""
from __future__ import annotations

import json
import struct
import threading
import time

import grpc
import pytest
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kgrpc

from cluster.api.tpserve.v1 import tpserve_pb2 as pb
from tests.cluster.helpers import greedy_request, status, stub, wait_blocks_free, wait_replicas
from tests.reliability import record

MODEL = "smollm2-135m"
VOCAB = 49152
OK, BAD = "ok", "bad"
SURROGATE = "\ud800"

# ---- OpenAI HTTP: (endpoint, field, value, expected, the field the error must name) ------------------
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HTTP_TABLE = [
    (COMPLETIONS, "top_k", 10**19, BAD, "top_k"),  # the request that took down four replicas
    (COMPLETIONS, "top_k", 2**63, BAD, "top_k"), (COMPLETIONS, "top_k", VOCAB + 1, BAD, "top_k"),
    (COMPLETIONS, "top_k", -2**63, BAD, "top_k"), (COMPLETIONS, "top_k", VOCAB, OK, None),
    (COMPLETIONS, "max_tokens", 2**63, BAD, "max_tokens"), (COMPLETIONS, "max_tokens", 2**64, BAD, "max_tokens"),
    (COMPLETIONS, "max_tokens", -1, BAD, "max_tokens"), (CHAT, "max_completion_tokens", 2**63, BAD,
                                                          "max_completion_tokens"),
    (COMPLETIONS, "seed", 2**63, BAD, "seed"), (COMPLETIONS, "seed", 2**64 + 5, BAD, "seed"),
    (COMPLETIONS, "seed", -1, BAD, "seed"), (COMPLETIONS, "seed", 2**63 - 1, OK, None),
    (COMPLETIONS, "n", 2**63, BAD, "n"), (COMPLETIONS, "logprobs", 2**63, BAD, "logprobs"),
    (COMPLETIONS, "logprobs", -1, BAD, "logprobs"),
    (CHAT, "top_logprobs", 2**63, BAD, "top_logprobs"),
    (COMPLETIONS, "temperature", 5e-324, OK, None), (COMPLETIONS, "temperature", 1e-300, OK, None),
    (COMPLETIONS, "temperature", 1.7976931348623157e308, OK, None),
    (COMPLETIONS, "temperature", -5e-324, BAD, "temperature"),
    (COMPLETIONS, "top_p", 5e-324, OK, None), (COMPLETIONS, "min_p", 5e-324, OK, None),
    (COMPLETIONS, "repetition_penalty", 1e-300, BAD, "repetition_penalty"),
    (COMPLETIONS, "repetition_penalty", 1e300, BAD, "repetition_penalty"),
    (COMPLETIONS, "presence_penalty", 1e308, BAD, "presence_penalty"),
    (COMPLETIONS, "frequency_penalty", -1e308, BAD, "frequency_penalty"),
    (COMPLETIONS, "prompt", [2**63], BAD, "prompt"), (COMPLETIONS, "prompt", [-1], BAD, "prompt"),
    (COMPLETIONS, "prompt", [VOCAB], BAD, "prompt"), (COMPLETIONS, "prompt", [1, 2, VOCAB - 1], OK, None),
    (COMPLETIONS, "prompt", "hi " + SURROGATE, BAD, "prompt"),
    (CHAT, "messages", [{"role": "user", "content": SURROGATE}], BAD, "messages[0].content"),
    (CHAT, "messages", [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}], BAD, "messages"),
    (COMPLETIONS, "stop", ["ok", SURROGATE], BAD, "stop"), (COMPLETIONS, "stop", SURROGATE, BAD, "stop"),
    (COMPLETIONS, "cache_salt", SURROGATE, BAD, "cache_salt"),
]

# ---- tpserve.v1 (proto types bound some values already: the widest each type carries) ------------------
V1_TABLE = [
    ("top_k", dict(top_k=2**31 - 1), BAD, "top_k"), ("top_k", dict(top_k=-2**31), BAD, "top_k"),
    ("top_k", dict(top_k=VOCAB), OK, None),
    ("max_tokens", dict(max_tokens=2**32 - 1), BAD, "max_tokens"),
    ("seed", dict(seed=2**64 - 1), BAD, "seed"), ("seed", dict(seed=2**63), BAD, "seed"),
    ("logprobs", dict(logprobs=2**32 - 1), BAD, "logprobs"),
    ("stop_token_ids", dict(stop_token_ids=[2**32 - 1]), BAD, "stop_token_ids"),
    ("temperature", dict(temperature=1e-45), OK, None), ("temperature", dict(temperature=3.4e38), OK, None),
    ("repetition_penalty", dict(repetition_penalty=1e-45), BAD, "repetition_penalty"),
    ("repetition_penalty", dict(repetition_penalty=3.4e38), BAD, "repetition_penalty"),
    ("presence_penalty", dict(presence_penalty=3.4e38), BAD, "presence_penalty"),
    ("top_p", dict(top_p=1e-45), OK, None), ("min_p", dict(min_p=1e-45), OK, None),
]
V1_TOKEN_IDS = [([2**32 - 1], BAD), ([VOCAB], BAD), ([0, 1, VOCAB - 1], OK)]

# ---- KServe v2: JSON sampling_parameters, and typed tensors ---------------------------------------------
KSERVE_JSON = [
    ({"top_k": 10**19}, BAD, "top_k"), ({"top_k": VOCAB + 1}, BAD, "top_k"), ({"seed": 2**64}, BAD, "seed"),
    ({"max_tokens": 2**63}, BAD, "max_tokens"), ({"logprobs": 2**63}, BAD, "logprobs"),
    ({"stop_token_ids": [-1]}, BAD, "stop_token_ids"), ({"stop_token_ids": [2**63]}, BAD, "stop_token_ids"),
    ({"stop": [SURROGATE]}, BAD, "stop"), ({"cache_salt": SURROGATE}, BAD, "cache_salt"),
    ({"temperature": 5e-324}, OK, None), ({"repetition_penalty": 1e-300}, BAD, "repetition_penalty"),
]
KSERVE_TENSORS = [
    ("max_tokens", "INT64", struct.pack("<q", 2**63 - 1), BAD), ("max_tokens", "UINT64", struct.pack("<Q", 2**64 - 1),
                                                                 BAD),
    ("max_tokens", "INT64", struct.pack("<q", -2**63), BAD), ("top_k", "INT64", struct.pack("<q", 2**63 - 1), BAD),
    ("top_k", "INT64", struct.pack("<q", -2**63), BAD), ("random_seed", "UINT64", struct.pack("<Q", 2**64 - 1), BAD),
    ("random_seed", "INT64", struct.pack("<q", -1), BAD), ("temperature", "FP64", struct.pack("<d", 5e-324), OK),
]


def _bytes_el(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b


def _kserve(extra_inputs, params_json=None):
    inputs = [(kpb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1]),
               _bytes_el(b"Hello there"))]
    if not any(t.name == "max_tokens" for t, _ in extra_inputs):
        inputs.append((kpb.ModelInferRequest.InferInputTensor(name="max_tokens", datatype="INT32", shape=[1]),
                       struct.pack("<i", 2)))
    inputs += extra_inputs
    if params_json is not None:
        raw = json.dumps(params_json).encode("utf-8", "surrogatepass")
        inputs.append((kpb.ModelInferRequest.InferInputTensor(name="sampling_parameters", datatype="BYTES",
                                                             shape=[1]), _bytes_el(raw)))
    return kpb.ModelInferRequest(model_name=MODEL, inputs=[t for t, _ in inputs],
                                 raw_input_contents=[r for _, r in inputs])


def _outcome(call):
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def _processes(cluster):
    st = status(cluster)
    return st.replica_restarts, sorted((r.replica_id, tuple(sorted(w.pid for w in r.workers))) for r in st.replicas)


def test_extreme_values_in_every_field_of_every_api_are_refused_naming_it_and_no_replica_is_lost(cluster):
    import httpx

    restarts, processes = _processes(cluster)
    counts = {"http": 0, "tpserve.v1": 0, "kserve": 0}
    failures = []
    with httpx.Client(base_url=cluster.http, timeout=60) as h:
        for path, field, value, want, names in HTTP_TABLE:
            body = {"model": MODEL, "max_tokens": 2, "temperature": 0}
            body.update({"prompt": "Hello"} if path == COMPLETIONS else {"messages": [{"role": "user",
                                                                                      "content": "Hello"}]})
            if field == "top_logprobs":
                body["logprobs"] = True
            if field == "max_completion_tokens":
                del body["max_tokens"]
            body[field] = value
            raw = json.dumps(body).encode("utf-8", "surrogatepass")  # "\ud800" as JSON escapes it
            r = h.post(path, content=raw, headers={"content-type": "application/json"})
            counts["http"] += 1
            if want == OK:
                ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
            else:
                err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") \
                    else {}
                ok = r.status_code == 400 and names in (err.get("param") or "") and names in err.get("message", "")
            if not ok:
                failures.append((path, field, value, r.status_code, r.text[:300]))
    s = stub(cluster)
    for field, kw, want, names in V1_TABLE:
        sampling = pb.SamplingParameters(**{"max_tokens": 2, "temperature": 0, **kw})
        code, details = _outcome(lambda: s.Complete(pb.GenerateRequest(prompt="Hello", sampling=sampling), timeout=60))
        counts["tpserve.v1"] += 1
        if (want == OK and code != grpc.StatusCode.OK) or \
                (want == BAD and (code != grpc.StatusCode.INVALID_ARGUMENT or names not in details)):
            failures.append(("v1", field, kw, code, details))
    for ids, want in V1_TOKEN_IDS:
        code, details = _outcome(lambda: s.Complete(pb.GenerateRequest(
            prompt_token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParameters(max_tokens=2)), timeout=60))
        counts["tpserve.v1"] += 1
        if (code == grpc.StatusCode.OK) != (want == OK) or (want == BAD and "prompt_token_ids" not in details):
            failures.append(("v1", "prompt_token_ids", ids, code, details))
    k = kgrpc.GRPCInferenceServiceStub(cluster.channel())
    for params, want, names in KSERVE_JSON:
        code, details = _outcome(lambda: k.ModelInfer(_kserve([], params), timeout=60))
        counts["kserve"] += 1
        if (code == grpc.StatusCode.OK) != (want == OK) or (want == BAD and (
                code != grpc.StatusCode.INVALID_ARGUMENT or names not in details)):
            failures.append(("kserve json", params, code, details))
    for name, dtype, raw, want in KSERVE_TENSORS:
        tensor = kpb.ModelInferRequest.InferInputTensor(name=name, datatype=dtype, shape=[1])
        code, details = _outcome(lambda: k.ModelInfer(_kserve([(tensor, raw)]), timeout=60))
        counts["kserve"] += 1
        field = "seed" if name == "random_seed" else name
        if (code == grpc.StatusCode.OK) != (want == OK) or (want == BAD and (
                code != grpc.StatusCode.INVALID_ARGUMENT or not (field in details or name in details))):
            failures.append(("kserve tensor", name, dtype, code, details))
    assert not failures, failures
    assert stub(cluster).Complete(greedy_request(n=3), timeout=60).completion_tokens == 3
    st = wait_blocks_free(cluster)
    assert all(r.kv_blocks_free == r.kv_blocks_total for r in st.replicas) and st.requests_in_flight == 0
    assert _processes(cluster) == (restarts, processes)  # no rank process was replaced
    record("poison", {"extreme_values": counts, "tried": sum(counts.values()), "failures": 0,
                      "replicas_lost": 0})


# ---- the dead-letter rule, end to end ---------------------------------------------------------------------
POISON_SALT = "failpoint-7f3a"


@pytest.fixture(scope="module")
def three_tiny_replicas(tmp_path_factory, tiny_text_model):
    from tests.cluster.conftest import ServeProcess

    # 24 KV blocks of 16 tokens (8 KiB each for this model): a cache smaller than the model's context
    # of 512, and no --max-model-len, so the served context is what the cache holds (384).
    server = ServeProcess(["--model", str(tiny_text_model), "--served-model-name", "tiny", "--replicas", "3",
                           "--kv-cache-memory", str(24 * 8192), "--ray-num-cpus", "3", "--routing", "least-load",
                           "--expose-topology"],
                          tmp_path_factory.mktemp("dead-letter"), env={"TPSERVE_FAILPOINT_SALT": POISON_SALT})
    yield server
    server.terminate()


def test_a_request_that_fails_every_replica_it_reaches_costs_two_and_is_not_retried(three_tiny_replicas):
    server = three_tiny_replicas
    s = stub(server)
    before = wait_replicas(server, 3)
    # A long stream of another client shares the replicas; it must come through whole.
    other, errors = [], []

    def run_other():
        try:
            for msg in s.Generate(pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParameters(
                    max_tokens=200, temperature=0, ignore_eos=True)), timeout=120):
                other.extend(msg.token_ids)
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=run_other, daemon=True)
    t.start()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        s.Complete(pb.GenerateRequest(prompt="poison", cache_salt=POISON_SALT, request_id="poison-1",
                                      sampling=pb.SamplingParameters(max_tokens=4)), timeout=120)
    took = time.monotonic() - started
    assert info.value.code() == grpc.StatusCode.INTERNAL, info.value
    assert "request poison-1 was in flight on 2 replicas that failed; not retried" in info.value.details()
    t.join(120)
    assert not errors and len(other) == 200, (errors, len(other))
    deadline = time.monotonic() + 120
    while (after := wait_replicas(server, 3)).replica_restarts < 2:
        assert time.monotonic() < deadline, after
        time.sleep(0.5)
    time.sleep(2)
    after = wait_replicas(server, 3)
    assert after.replica_restarts - before.replica_restarts == 2  # not a third, nor four
    assert s.Complete(greedy_request(n=3), timeout=60).completion_tokens == 3
    record("quarantine", {"replicas_failed": 2, "replicas": 3, "status": "INTERNAL",
                          "seconds_to_answer": round(took, 2), "other_stream_tokens": len(other)})


def test_without_max_model_len_the_context_is_what_the_kv_cache_holds(three_tiny_replicas):
    """A request without max_tokens gets the rest of that context, not a 400 for KV blocks."""
    import httpx

    server = three_tiny_replicas
    info = stub(server).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert info.max_model_len == 384  # 24 blocks x 16, below the model's 512
    with httpx.Client(base_url=server.http, timeout=120) as h:
        assert h.get("/v1/models").json()["data"][0]["max_model_len"] == 384
        r = h.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                                 "ignore_eos": True})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert r.json()["choices"][0]["finish_reason"] == "length" and usage["total_tokens"] == 384

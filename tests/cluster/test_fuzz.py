"""Ten thousand generated malformed requests against both gRPC APIs (and health) of the shared cluster.

Each example is a valid request with one defect (or raw bytes that are no message at all); the
defect decides the status it must get and the field its message must name. Nothing may come
back UNKNOWN or INTERNAL, and afterwards the server is healthy, serves, and every KV block is free.
"""
from __future__ import annotations

import json
import math
import os
import struct
import time
from collections import Counter

import psutil

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kgrpc

from cluster.api.tpserve.v1 import tpserve_pb2 as pb
from tests.cluster.helpers import greedy_request, stub, wait_blocks_free
from tests.cluster.test_poison import BAD, HTTP_TABLE, KSERVE_JSON, KSERVE_TENSORS, V1_TABLE
from tests.reliability import record

# Per API (a quarter of the KServe ones go through ModelStreamInfer); 1,000 health names. `make
# reliability` (scripts/reliability_report.py) generates 5,000 per API for docs/reliability.md;
# `make test` 1,500, which keeps the suite within its time.
EXAMPLES = int(os.environ.get("TPSERVE_FUZZ_EXAMPLES", "1500"))
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))

bad_floats = st.sampled_from([math.nan, math.inf, -math.inf])
garbage = st.binary(min_size=1, max_size=64)
not_utf8 = st.sampled_from([b"\xff", b"\xc3\x28", b"abc\xe2\x82", b"\xed\xa0\x80", b"\x80hello"])


def _varint(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


# ---- tpserve.v1 ---------------------------------------------------------------------------------
def sampling(**kw) -> pb.SamplingParameters:
    return pb.SamplingParameters(max_tokens=2, temperature=0, **kw)


def v1_case(draw) -> tuple[bytes | pb.GenerateRequest, set, str]:
    """(request, allowed status codes, a field name the message must mention)."""
    kind = draw(st.sampled_from([
        "model", "empty_prompt", "non_utf8_prompt", "over_context", "over_chars", "temperature", "top_p", "top_k",
        "min_p", "repetition_penalty", "penalty", "max_tokens_zero", "max_tokens_absurd", "logprobs", "stop_empty",
        "stop_many", "stop_token_ids", "token_ids_empty", "token_ids_vocab", "role", "no_messages", "no_input",
        "seed", "request_id", "stop_long", "huge_request_id", "huge_chat", "huge_stop_list", "huge_stop_ids",
        "cache_salt", "huge_token_ids", "extreme", "garbage"]))
    ok = "Hello there"
    if kind == "model":
        name = draw(st.text(min_size=1, max_size=20).filter(lambda s: s != "smollm2-135m"))
        return pb.GenerateRequest(model=name, prompt=ok, sampling=sampling()), {NOT_FOUND}, "model"
    if kind == "empty_prompt":
        return pb.GenerateRequest(prompt="", sampling=sampling()), {INVALID}, "prompt"
    if kind == "non_utf8_prompt":  # field 2 (prompt) carrying bytes that are not UTF-8
        raw = draw(not_utf8)
        return b"\x12" + _varint(len(raw)) + raw, {INVALID}, "request"
    if kind == "over_context":
        words = draw(st.integers(1100, 4000))
        return pb.GenerateRequest(prompt="hello " * words, sampling=sampling()), {INVALID}, "prompt"
    if kind == "over_chars":
        return pb.GenerateRequest(prompt="x" * 1_000_001, sampling=sampling()), {INVALID}, "prompt"
    if kind in ("temperature", "top_p", "min_p", "repetition_penalty"):
        lo_bad = {"temperature": st.floats(-1e6, -1e-3), "top_p": st.one_of(st.floats(1.001, 1e6), st.just(0.0),
                                                                               st.floats(-1e6, -1e-6)),
                  "min_p": st.one_of(st.floats(1.001, 1e6), st.floats(-1e6, -1e-6)),
                  "repetition_penalty": st.floats(-1e6, 0.0)}[kind]
        value = draw(st.one_of(lo_bad, bad_floats))
        return pb.GenerateRequest(prompt=ok, sampling=sampling(**{kind: value}) if kind != "temperature" else
                                  pb.SamplingParameters(max_tokens=2, temperature=value)), {INVALID}, kind
    if kind == "top_k":
        return pb.GenerateRequest(prompt=ok, sampling=sampling(top_k=draw(st.integers(-2**31, -2)))), {INVALID}, "top_k"
    if kind == "penalty":
        name = draw(st.sampled_from(["presence_penalty", "frequency_penalty"]))
        value = draw(st.one_of(st.floats(2.001, 1e9), st.floats(-1e9, -2.001), bad_floats))
        return pb.GenerateRequest(prompt=ok, sampling=sampling(**{name: value})), {INVALID}, name
    if kind == "max_tokens_zero":
        return pb.GenerateRequest(prompt=ok, sampling=pb.SamplingParameters(max_tokens=0)), {INVALID}, "max_tokens"
    if kind == "max_tokens_absurd":
        n = draw(st.integers(1100, 2**32 - 1))
        return pb.GenerateRequest(prompt=ok, sampling=pb.SamplingParameters(max_tokens=n)), {INVALID}, "max_tokens"
    if kind == "logprobs":
        n = draw(st.integers(21, 2**32 - 1))
        return pb.GenerateRequest(prompt=ok, sampling=sampling(logprobs=n)), {INVALID}, "logprobs"
    if kind == "stop_empty":
        return pb.GenerateRequest(prompt=ok, sampling=sampling(stop=["a", ""])), {INVALID}, "stop"
    if kind == "stop_many":
        return pb.GenerateRequest(prompt=ok, sampling=sampling(stop=[str(i) for i in range(17)])), {INVALID}, "stop"
    if kind == "stop_token_ids":
        t = draw(st.integers(49152, 2**32 - 1))
        return pb.GenerateRequest(prompt=ok, sampling=sampling(stop_token_ids=[1, t])), {INVALID}, "stop_token_ids"
    if kind == "token_ids_empty":
        return pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[]), sampling=sampling()), {INVALID}, "prompt_token_ids"
    if kind == "token_ids_vocab":
        ids = draw(st.lists(st.integers(49152, 2**32 - 1), min_size=1, max_size=5))
        return pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1] + ids), sampling=sampling()), {INVALID}, \
            "prompt_token_ids"
    if kind == "role":
        role = draw(st.text(max_size=10).filter(lambda r: r not in ("system", "user", "assistant")))
        msgs = pb.ChatMessages(messages=[pb.ChatMessage(role=role, content="hi")])
        return pb.GenerateRequest(messages=msgs, sampling=sampling()), {INVALID}, "role"
    if kind == "no_messages":
        return pb.GenerateRequest(messages=pb.ChatMessages(), sampling=sampling()), {INVALID}, "messages"
    if kind == "no_input":
        return pb.GenerateRequest(sampling=sampling()), {INVALID}, "input"
    if kind == "seed":
        return pb.GenerateRequest(prompt=ok, sampling=sampling(seed=draw(st.integers(2**63, 2**64 - 1)))), \
            {INVALID}, "seed"
    if kind == "request_id":
        rid = draw(st.one_of(st.text(min_size=257, max_size=400), st.sampled_from(["a\nb", "\x00", "tab\there"])))
        return pb.GenerateRequest(prompt=ok, request_id=rid, sampling=sampling()), {INVALID}, "request_id"
    if kind == "stop_long":
        return pb.GenerateRequest(prompt=ok, sampling=sampling(stop=["y" * draw(st.integers(257, 5000))])), \
            {INVALID}, "stop"
    if kind == "huge_request_id":
        rid = "r" * draw(st.integers(10_000, 200_000))
        return pb.GenerateRequest(prompt=ok, request_id=rid, sampling=sampling()), {INVALID}, "request_id"
    if kind == "huge_chat":  # more than 1M characters over several messages: the one that crosses is named
        n = draw(st.integers(2, 5))
        each = 1_000_000 // n + draw(st.integers(1, 50_000))
        msgs = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="z" * each) for _ in range(n)])
        return pb.GenerateRequest(messages=msgs, sampling=sampling()), {INVALID}, "].content"
    if kind == "huge_stop_list":
        stops = ["s"] * draw(st.integers(17, 100_000))
        return pb.GenerateRequest(prompt=ok, sampling=sampling(stop=stops)), {INVALID}, "stop"
    if kind == "huge_stop_ids":
        ids = [1] * draw(st.integers(65, 100_000))
        return pb.GenerateRequest(prompt=ok, sampling=sampling(stop_token_ids=ids)), {INVALID}, "stop_token_ids"
    if kind == "huge_token_ids":
        ids = [7] * draw(st.integers(1024, 200_000))
        return pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids), sampling=sampling()), {INVALID}, \
            "prompt_token_ids"
    if kind == "cache_salt":
        return pb.GenerateRequest(prompt=ok, cache_salt="c" * draw(st.integers(257, 100_000)),
                                  sampling=sampling()), {INVALID}, "cache_salt"
    if kind == "extreme":  # the widest values the proto types carry (test_poison's table)
        _, kw, _, name = draw(st.sampled_from([e for e in V1_TABLE if e[2] == BAD]))
        return pb.GenerateRequest(prompt=ok, sampling=pb.SamplingParameters(**{"max_tokens": 2, "temperature": 0,
                                                                               **kw})), {INVALID}, name
    # Bytes that are (almost always) no GenerateRequest; when they do parse, whatever they ask
    # for must still get a clean answer.
    return draw(garbage), {INVALID, NOT_FOUND, grpc.StatusCode.OK}, ""


@pytest.fixture(scope="module")
def seen(cluster):
    counts: dict[str, Counter] = {"tpserve.v1": Counter(), "kserve": Counter(), "kserve-stream": Counter()}
    frontend = psutil.Process(cluster.proc.pid)
    before = frontend.memory_info().rss
    yield counts
    total = sum(sum(c.values()) for c in counts.values())
    record("fuzz", {**{api: dict(c) for api, c in counts.items()}, "requests": total,
                    "frontend_rss_growth_mb": round((frontend.memory_info().rss - before) / 2**20, 1)})


def outcome(call) -> tuple[grpc.StatusCode, str]:
    """(code, details) of a call: the status it raised, else OK (or the status it returns)."""
    try:
        result = call()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return result if isinstance(result, tuple) else (grpc.StatusCode.OK, "")


def check(code, details, allowed, field, what):
    assert code in allowed, (what, code, details)
    if code != grpc.StatusCode.OK and field:
        assert field in details, (what, code, details)


def test_malformed_tpserve_v1_requests_get_the_expected_status(cluster, seen):
    channel = cluster.channel()
    complete = channel.unary_unary("/tpserve.v1.TpserveService/Complete")
    generate = channel.unary_stream("/tpserve.v1.TpserveService/Generate")

    @SETTINGS
    @given(st.data(), st.booleans())
    def one(data, streaming):
        request, allowed, field = v1_case(data.draw)
        raw = request if isinstance(request, bytes) else request.SerializeToString()
        code, details = outcome(lambda: list(generate(raw, timeout=60)) if streaming else complete(raw, timeout=60))
        seen["tpserve.v1"][code.name] += 1
        check(code, details, allowed, field, request)

    one()
    assert_healthy_and_idle(cluster)


# ---- KServe v2 ------------------------------------------------------------------------------------
def tensor(name, datatype, shape, raw) -> tuple[kpb.ModelInferRequest.InferInputTensor, bytes]:
    return kpb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape), raw


def bytes_el(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b


def kserve_request(inputs, model="smollm2-135m", version="") -> kpb.ModelInferRequest:
    return kpb.ModelInferRequest(model_name=model, model_version=version, id="fuzz",
                                 inputs=[t for t, _ in inputs], raw_input_contents=[r for _, r in inputs])


def kserve_case(draw):
    text = tensor("text_input", "BYTES", [1], bytes_el(b"Hello there"))
    max_tokens = tensor("max_tokens", "INT32", [1], struct.pack("<i", 2))
    kind = draw(st.sampled_from([
        "model", "version", "no_text", "text_dtype", "text_shape", "text_utf8", "text_empty", "text_truncated",
        "no_max_tokens", "max_tokens_value", "max_tokens_dtype", "max_tokens_bytes", "temperature", "top_p",
        "top_k", "seed", "json_bad", "json_not_object", "json_unknown", "json_type", "json_value", "unknown_input",
        "buffer_count", "bomb", "huge_id", "bad_id", "shape", "dtype", "stop_words", "extreme_json",
        "extreme_tensor", "garbage"]))
    if kind == "model":
        name = draw(st.text(min_size=0, max_size=20).filter(lambda s: s != "smollm2-135m"))
        return kserve_request([text, max_tokens], model=name), {NOT_FOUND}, "model"
    if kind == "version":
        v = draw(st.text(min_size=1, max_size=5).filter(lambda s: s != "1"))
        return kserve_request([text, max_tokens], version=v), {NOT_FOUND}, "version"
    if kind == "no_text":
        return kserve_request([max_tokens]), {INVALID}, "text_input"
    if kind == "text_dtype":
        dt = draw(st.sampled_from(["INT32", "FP32", "BOOL", "UINT8", "FP16", "nonsense"]))
        return kserve_request([tensor("text_input", dt, [1], b"\x00\x00\x00\x00"), max_tokens]), {INVALID}, "text_input"
    if kind == "text_shape":
        shape = draw(st.sampled_from([[2], [1, 2], [], [0], [3, 1], [1, 1, 1]]))
        return kserve_request([tensor("text_input", "BYTES", shape, bytes_el(b"hi")), max_tokens]), {INVALID}, \
            "text_input"
    if kind == "text_utf8":
        return kserve_request([tensor("text_input", "BYTES", [1], bytes_el(draw(not_utf8))), max_tokens]), \
            {INVALID}, "text_input"
    if kind == "text_empty":
        return kserve_request([tensor("text_input", "BYTES", [1], bytes_el(b"")), max_tokens]), {INVALID}, "text_input"
    if kind == "text_truncated":
        raw = draw(st.sampled_from([b"\x05\x00\x00\x00ab", b"\x01\x00", b"\xff\xff\xff\xffabc"]))
        return kserve_request([tensor("text_input", "BYTES", [1], raw), max_tokens]), {INVALID}, "text_input"
    if kind == "no_max_tokens":
        return kserve_request([text]), {INVALID}, "max_tokens"
    if kind == "max_tokens_value":
        n = draw(st.one_of(st.integers(-2**31, 0), st.integers(1100, 2**31 - 1)))
        return kserve_request([text, tensor("max_tokens", "INT32", [1], struct.pack("<i", n))]), {INVALID}, "max_tokens"
    if kind == "max_tokens_dtype":
        return kserve_request([text, tensor("max_tokens", "FP32", [1], struct.pack("<f", 2.0))]), {INVALID}, "max_tokens"
    if kind == "max_tokens_bytes":
        raw = draw(st.binary(max_size=12).filter(lambda b: len(b) != 4))
        return kserve_request([text, tensor("max_tokens", "INT32", [1], raw)]), {INVALID}, "max_tokens"
    if kind == "temperature":
        v = draw(st.one_of(bad_floats, st.floats(-1e9, -1e-3)))
        return kserve_request([text, max_tokens, tensor("temperature", "FP32", [1], struct.pack("<f", v))]), \
            {INVALID}, "temperature"
    if kind == "top_p":
        v = draw(st.one_of(bad_floats, st.floats(1.01, 1e9), st.floats(-1e9, 0.0)))
        return kserve_request([text, max_tokens, tensor("top_p", "FP64", [1], struct.pack("<d", v))]), \
            {INVALID}, "top_p"
    if kind == "top_k":
        v = draw(st.integers(-2**31, -2))
        return kserve_request([text, max_tokens, tensor("top_k", "INT32", [1], struct.pack("<i", v))]), \
            {INVALID}, "top_k"
    if kind == "seed":
        v = draw(st.integers(-2**63, -1))
        return kserve_request([text, max_tokens, tensor("random_seed", "INT64", [1], struct.pack("<q", v))]), \
            {INVALID}, "seed"
    if kind.startswith("json"):
        body = {
            "json_bad": draw(st.sampled_from(["{", "{'a': 1}", "[1,", "nul", "{\"temperature\": }"])),
            "json_not_object": json.dumps(draw(st.one_of(st.integers(), st.lists(st.integers(), max_size=3),
                                                         st.text(max_size=5)))),
            "json_unknown": json.dumps({draw(st.text(min_size=1, max_size=8).filter(
                lambda k: k not in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                    "presence_penalty", "frequency_penalty", "seed", "stop", "stop_token_ids",
                                    "ignore_eos", "logprobs"))): 1}),
            "json_type": json.dumps({draw(st.sampled_from(["top_k", "seed", "logprobs", "max_tokens"])):
                                     draw(st.one_of(st.text(max_size=4), st.floats(0.5, 9.5), st.booleans()))}),
            "json_value": draw(st.sampled_from(['{"temperature": NaN}', '{"top_p": 7}', '{"min_p": -1}',
                                                '{"stop": [""]}', '{"stop_token_ids": [-4]}', '{"logprobs": 99}',
                                                '{"presence_penalty": Infinity}', '{"seed": -1}'])),
        }[kind]
        return kserve_request([text, max_tokens, tensor("sampling_parameters", "BYTES", [1],
                                                        bytes_el(body.encode()))]), {INVALID}, "sampling_parameters" \
            if kind in ("json_bad", "json_not_object", "json_unknown", "json_type") else ""
    if kind == "unknown_input":
        name = draw(st.text(min_size=1, max_size=10).filter(lambda n: n not in (
            "text_input", "max_tokens", "stream", "temperature", "top_p", "top_k", "random_seed", "stop_words",
            "sampling_parameters")))
        return kserve_request([text, max_tokens, tensor(name, "INT32", [1], b"\x01\x00\x00\x00")]), {INVALID}, ""
    if kind == "bomb":
        body = draw(st.sampled_from([
            '{"seed": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000, '{"a": ' + "[" * 100_000,
            '{"stop": ["' + "q" * 70_000 + '"]}', '{"temperature": 1' + "0" * 5000 + "}"]))
        return kserve_request([text, max_tokens, tensor("sampling_parameters", "BYTES", [1], bytes_el(body.encode()))]), \
            {INVALID}, "sampling_parameters"
    if kind == "huge_id":
        req = kserve_request([text, max_tokens])
        req.id = "i" * draw(st.integers(257, 200_000))
        return req, {INVALID}, "id"
    if kind == "bad_id":
        req = kserve_request([text, max_tokens])
        req.id = draw(st.sampled_from(["a\nb", "\x00", "\x1b[31m"]))
        return req, {INVALID}, "id"
    if kind == "shape":
        name, dt, raw = draw(st.sampled_from([("max_tokens", "INT32", struct.pack("<ii", 2, 2)),
                                              ("temperature", "FP32", struct.pack("<ff", 1, 1)),
                                              ("stream", "BOOL", b"\x01\x01")]))
        shape = draw(st.sampled_from([[2], [1, 2], [2, 1]]))
        return kserve_request([text, tensor(name, dt, shape, raw)] + ([] if name == "max_tokens" else [max_tokens])), \
            {INVALID}, name
    if kind == "dtype":
        name = draw(st.sampled_from(["max_tokens", "temperature", "top_p", "top_k", "random_seed", "stream",
                                     "stop_words", "sampling_parameters"]))
        dt = draw(st.sampled_from(["BYTES", "FP16", "BF16", "INT8", "UINT8", "INT16", "", "int32"]))
        ok_types = {"max_tokens": "INT32", "temperature": "FP32", "top_p": "FP32", "top_k": "INT32",
                    "random_seed": "UINT64", "stream": "BOOL", "stop_words": "BYTES", "sampling_parameters": "BYTES"}
        if dt == ok_types[name]:
            dt = "FP16"
        extra = [] if name == "max_tokens" else [max_tokens]
        return kserve_request([text, tensor(name, dt, [1], b"\x01\x00\x00\x00")] + extra), {INVALID}, name
    if kind == "stop_words":
        n = draw(st.integers(17, 20_000))
        return kserve_request([text, max_tokens, tensor("stop_words", "BYTES", [n], bytes_el(b"w") * n)]), \
            {INVALID}, "stop"
    if kind == "buffer_count":
        req = kserve_request([text, max_tokens])
        req.raw_input_contents.append(b"extra")
        return req, {INVALID}, "raw_input_contents"
    if kind == "extreme_json":  # test_poison's table: 2^63 and past it, lone surrogates
        params, _, name = draw(st.sampled_from([e for e in KSERVE_JSON if e[1] == BAD]))
        blob = json.dumps(params).encode()
        return kserve_request([text, max_tokens, tensor("sampling_parameters", "BYTES", [1], bytes_el(blob))]), \
            {INVALID}, name
    if kind == "extreme_tensor":
        name, dt, raw, _ = draw(st.sampled_from([e for e in KSERVE_TENSORS if e[3] == BAD]))
        extra = [] if name == "max_tokens" else [max_tokens]
        return kserve_request([text, tensor(name, dt, [1], raw)] + extra), {INVALID}, \
            "seed" if name == "random_seed" else name
    return draw(garbage), {INVALID, NOT_FOUND, grpc.StatusCode.OK}, ""


def stream_status(responses) -> tuple[grpc.StatusCode, str]:
    """ModelStreamInfer reports a request's error in-stream as 'CODE: message'; a stream that ends
    without an error or a final response left its request unanswered."""
    for r in responses:
        if r.error_message:
            name, _, message = r.error_message.partition(": ")
            return grpc.StatusCode[name], message
        if r.infer_response.parameters["triton_final_response"].bool_param:
            return grpc.StatusCode.OK, ""
    return grpc.StatusCode.UNKNOWN, "the stream ended without answering the request"


def test_malformed_kserve_requests_get_the_expected_status(cluster, seen):
    channel = cluster.channel()
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    stream = kgrpc.GRPCInferenceServiceStub(channel).ModelStreamInfer

    @SETTINGS
    @given(st.data(), st.integers(0, 3))
    def one(data, route):
        request, allowed, field = kserve_case(data.draw)
        if route == 0 and not isinstance(request, bytes):  # a quarter through the decoupled stream
            code, details = outcome(lambda: stream_status(stream(iter([request]), timeout=60)))
            seen["kserve-stream"][code.name] += 1
        else:
            raw = request if isinstance(request, bytes) else request.SerializeToString()
            code, details = outcome(lambda: infer(raw, timeout=60))
            seen["kserve"][code.name] += 1
        check(code, details, allowed, field, request)

    one()
    assert_healthy_and_idle(cluster)


# ---- OpenAI-compatible HTTP ------------------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) |
                           st.text(max_size=20), lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
HTTP_FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
               "stream", "stop", "seed", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs",
               "top_k", "min_p", "repetition_penalty", "ignore_eos", "cache_salt", "tools", "response_format",
               "stream_options", "logit_bias", "user", "echo", "prompt_logprobs"]


def http_case(draw) -> tuple[str, bytes]:
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    body = {"model": "smollm2-135m", "max_tokens": 1}
    body.update({"prompt": "Hello"} if path == "/v1/completions" else
                {"messages": [{"role": "user", "content": "Hello"}]})
    kind = draw(st.sampled_from(["field", "field", "field", "bomb", "huge", "garbage", "shape", "extreme"]))
    if kind == "extreme":  # test_poison's table: 2^63 and past it, bad token ids, lone surrogates
        path, field, value, _, _ = draw(st.sampled_from([e for e in HTTP_TABLE if e[3] == BAD]))
        body = {"model": "smollm2-135m", "max_tokens": 1}
        body.update({"prompt": "Hello"} if path == "/v1/completions" else
                    {"messages": [{"role": "user", "content": "Hello"}]})
        if field == "top_logprobs":
            body["logprobs"] = True
        body[field] = value
        return path, json.dumps(body).encode()
    if kind == "field":  # one field set to any JSON value (mostly the wrong type or range)
        body[draw(st.sampled_from(HTTP_FIELDS))] = draw(json_values)
        return path, json.dumps(body).encode()
    if kind == "bomb":
        return path, draw(st.sampled_from([b"[" * 100_000, b'{"max_tokens": ' + b"9" * 5000 + b"}",
                                           b'{"a": ' + b"{" * 50_000]))
    if kind == "huge":  # past each field's bound (a prompt: 1M characters)
        name = draw(st.sampled_from(["stop", "prompt", "cache_salt"]))
        n = draw(st.integers(17, 100_000))
        body[name] = ["s"] * n if name == "stop" else "w" * (n + (1_000_000 if name == "prompt" else 256))
        return path, json.dumps(body).encode()
    if kind == "shape":
        return path, json.dumps(draw(st.one_of(st.lists(json_values, max_size=3), st.text(max_size=9),
                                               st.integers()))).encode()
    return path, draw(garbage)


def test_malformed_http_requests_get_an_openai_error_never_a_500(cluster, seen):
    import httpx

    seen["http"] = Counter()
    with httpx.Client(base_url=cluster.http, timeout=60) as h:
        @settings(max_examples=250, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.data())
        def one(data):
            path, raw = http_case(data.draw)
            r = h.post(path, content=raw, headers={"content-type": "application/json"})
            seen["http"][str(r.status_code)] += 1
            # 429: `n` up to 128 choices, each admitted as a request, can fill the admission queue.
            assert r.status_code in (200, 400, 404, 413, 429), (raw[:200], r.status_code, r.text[:300])
            if r.status_code != 200:
                err = r.json()["error"]
                assert err["message"] and err["type"], r.text[:300]
                if r.status_code == 400:
                    assert err["param"] and err["param"].split("[")[0].split(".")[0] in err["message"], err

        one()
    assert_healthy_and_idle(cluster)


# ---- health -------------------------------------------------------------------------------------------
def test_health_names_are_bounded_and_unknown_ones_answered(cluster, seen):
    health = health_pb2_grpc.HealthStub(cluster.channel())
    seen["health"] = Counter()

    @settings(max_examples=1000, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.text(min_size=257, max_size=5000), st.text(max_size=40)), st.booleans())
    def one(name, watch):
        request = health_pb2.HealthCheckRequest(service=name)
        if watch:
            call = health.Watch(request, timeout=10)
            code, details = outcome(lambda: (grpc.StatusCode.OK, str(next(call).status)))
            call.cancel()
        else:
            code, details = outcome(lambda: health.Check(request, timeout=10))
        seen["health"][code.name] += 1
        known = name in ("", "liveness", "smollm2-135m")
        if len(name) > 256:
            check(code, details, {INVALID}, "service", name)
        elif watch:
            assert code == grpc.StatusCode.OK and (known or details == str(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN))
        else:
            assert code == (grpc.StatusCode.OK if known else NOT_FOUND), (name, code, details)

    one()
    assert_healthy_and_idle(cluster)


def test_open_health_watches_are_bounded(cluster):
    from cluster.frontend.health import MAX_WATCHES

    health = health_pb2_grpc.HealthStub(cluster.channel())
    calls = [health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30) for _ in range(MAX_WATCHES)]
    try:
        for c in calls:
            assert next(c).status == health_pb2.HealthCheckResponse.SERVING
        extra = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            next(extra)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for c in calls:
            c.cancel()
    deadline = time.monotonic() + 10
    while True:  # the cancelled watches are gone: a new one is served
        probe = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        code, _ = outcome(lambda: (grpc.StatusCode.OK, next(probe)))
        probe.cancel()
        if code == grpc.StatusCode.OK or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert code == grpc.StatusCode.OK


def test_a_message_beyond_the_size_limit_is_refused_by_grpc_and_the_server_serves_on(cluster):
    with pytest.raises(grpc.RpcError) as info:
        stub(cluster).Complete(pb.GenerateRequest(prompt="x" * (17 << 20)), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # gRPC's own limit, before our code
    assert_healthy_and_idle(cluster)


def assert_healthy_and_idle(cluster):
    health = health_pb2_grpc.HealthStub(cluster.channel())
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING
    assert stub(cluster).Complete(greedy_request(n=3), timeout=60).completion_tokens == 3
    st = wait_blocks_free(cluster)
    assert st.replicas and all(r.kv_blocks_free == r.kv_blocks_total for r in st.replicas), st
    assert st.requests_in_flight == 0

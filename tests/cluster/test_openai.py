"""The OpenAI-compatible HTTP API on the shared cluster, through the real `openai` client (no
retries, so 429 and 503 show), httpx for what the client hides, and curl for SSE."""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time

import httpx
import openai
import pytest

from cluster.api.tpserve.v1 import tpserve_pb2 as pb
from tests.cluster.helpers import scrape, stub, wait_blocks_free

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"
QUESTION = "What is the capital of France?"


def client(cluster, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.http}/v1", api_key="none", max_retries=0, timeout=120, **kw)


def grpc_greedy(cluster, n: int, **input_) -> pb.CompleteResponse:
    return stub(cluster).Complete(pb.GenerateRequest(sampling=pb.SamplingParameters(max_tokens=n, temperature=0),
                                                     **input_), timeout=120)


def test_completions_and_chat_streamed_or_not_equal_the_grpc_api_with_usage(cluster):
    c = client(cluster)
    ref = grpc_greedy(cluster, 16, prompt=PROMPT)
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    assert r.choices[0].text == ref.text and r.model == MODEL and r.id.startswith("cmpl-") and r.created > 0
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (ref.prompt_tokens, 16, ref.prompt_tokens + 16)
    chunks = list(c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].usage.prompt_tokens == ref.prompt_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"

    chat_ref = grpc_greedy(cluster, 16, messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user",
                                                                                          content=QUESTION)]))
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=16,
                                  temperature=0)
    assert r.choices[0].message.content == chat_ref.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == chat_ref.prompt_tokens and r.usage.completion_tokens == chat_ref.completion_tokens
    chunks = list(c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        max_completion_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat_ref.text
    assert chunks[-1].usage.completion_tokens == chat_ref.completion_tokens
    models = c.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_stop_logprobs_extensions_and_the_default_max_tokens(cluster):
    c = client(cluster)
    full = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    words = full.split()
    stop = next(w for w in words[2:] if full.index(w) > 0)
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"

    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5 and "".join(lp.tokens) == r.choices[0].text
    assert all(len(top) <= 2 and v <= 0 for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "developer", "content": "Be brief."},
                                                         {"role": "user", "content": QUESTION}],
                                  max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob

    # vLLM-style extra body fields; and no max_tokens: 16 tokens (OpenAI's and vLLM's default), or
    # fewer where the context ends first (1024).
    r = c.completions.create(model=MODEL, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True, "top_k": 1})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 16
    ids = [100 + i % 200 for i in range(1020)]
    r = c.completions.create(model=MODEL, prompt=ids, temperature=0, extra_body={"ignore_eos": True, "top_k": 1})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4 and r.usage.prompt_tokens == 1020
    # chat without max_tokens: to the end of the context
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": " ".join(["word"] * 950)}],
                                  temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == 1024 and r.usage.completion_tokens > 16


BAD = [  # (endpoint, body change, status, the field the error must name)
    ("completions", {"temperature": -1}, 400, "temperature"),
    ("completions", {"max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"max_tokens": 5000}, 400, "max_tokens"),
    ("completions", {"top_p": "high"}, 400, "top_p"),
    ("completions", {"n": 0}, 400, "n"),
    ("completions", {"n": 500}, 400, "n"),
    ("completions", {"prompt": ["hi"] * 100, "n": 2}, 400, "prompt"),
    ("completions", {"prompt": []}, 400, "prompt"),
    ("completions", {"prompt": ["hi", "word " * 3000]}, 400, "prompt[1]"),
    ("completions", {"prompt": [[1, 2], [99999999]]}, 400, "prompt[1]"),
    ("completions", {"prompt_logprobs": 99}, 400, "prompt_logprobs"),
    ("completions", {"logprobs": 99}, 400, "logprobs"),
    ("completions", {"stop": [""]}, 400, "stop"),
    ("completions", {"model": "gpt-9"}, 404, "model"),
    ("completions", {"prompt": "word " * 3000}, 400, "prompt"),
    ("completions", {"prompt": None}, 400, "prompt"),
    ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat", {"messages": []}, 400, "messages"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"}, 400,
     "tool_choice"),
    ("chat", {"tools": [{"type": "nope"}], "tool_choice": "required"}, 400, "tools[0]"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}],
              "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
    ("chat", {"tool_choice": "required"}, 400, "tool_choice"),
    ("chat", {"response_format": {"type": "xml"}}, 400, "response_format.type"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     400, "response_format"),
    ("completions", {"structured_outputs": {"regex": "(unclosed"}}, 400, "structured_outputs"),
    ("completions", {"structured_outputs": {"choice": []}}, 400, "structured_outputs"),
    ("completions", {"response_format": {"type": "json_object"}, "guided_regex": "a+"}, 400, "guided_regex"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content[0]"),
    ("chat", {"max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ("chat", {"top_logprobs": 2}, 400, "top_logprobs"),
]


@pytest.mark.parametrize("endpoint,change,status,field", BAD, ids=[f"{e}-{'-'.join(c)}" for e, c, _, _ in BAD])
def test_bad_input_gets_the_openai_error_shape_naming_the_field(cluster, endpoint, change, status, field):
    body = {"model": MODEL, "max_tokens": 4}
    body.update({"prompt": PROMPT} if endpoint == "completions" else {"messages": [{"role": "user", "content": "hi"}]})
    body.update(change)
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    r = httpx.post(cluster.http + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"] and err["type"]


def test_bodies_that_are_not_requests_get_400_or_413(cluster):
    url = cluster.http + "/v1/completions"
    for raw in (b"{", b"[1, 2]", b"\xff\xfe", b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                b'{"model": "smollm2-135m", "prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}"):
        r = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] in ("body", "max_tokens"), (raw[:40], r.text)
    r = httpx.post(url, content=b" " * ((16 << 20) + 1), timeout=60)
    assert r.status_code == 413 and "error" in r.json()
    assert httpx.get(cluster.http + "/v1/nothing", timeout=10).status_code == 404


def test_overload_gets_429_and_the_admitted_finish(cluster):
    async def flood():
        async with httpx.AsyncClient(timeout=120) as h:
            async def one(i):
                return await h.post(cluster.http + "/v1/completions", json={
                    "model": MODEL, "prompt": f"Story {i}:", "max_tokens": 8, "temperature": 0, "ignore_eos": True})
            return await asyncio.gather(*(one(i) for i in range(60)))

    replies = asyncio.run(flood())
    codes = [r.status_code for r in replies]
    assert codes.count(429) >= 20 and codes.count(200) >= 8 and set(codes) <= {200, 429}, codes
    refused = next(r for r in replies if r.status_code == 429).json()["error"]
    assert refused["code"] == "rate_limit_exceeded" and "admission" in refused["message"]

    async def saturated_call():  # the openai client sees a full server as RateLimitError, unretried
        async with httpx.AsyncClient(timeout=120) as h:
            flood = asyncio.gather(*(h.post(cluster.http + "/v1/completions", json={
                "model": MODEL, "prompt": "x", "max_tokens": 16, "ignore_eos": True}) for _ in range(30)))
            # Full once the admission bound (2 replicas x 8 + a queue of 8) is in flight: waited
            # for on the frontend's own gauge, since a fixed wait missed it on a busy CI machine.
            deadline = time.monotonic() + 30
            while (now := await asyncio.to_thread(running, cluster)) < 24:
                assert time.monotonic() < deadline, f"the server never filled: {now:.0f} running"
                await asyncio.sleep(0.05)
            with pytest.raises(openai.RateLimitError):
                await asyncio.to_thread(client(cluster).completions.create, model=MODEL, prompt="y", max_tokens=2)
            await flood

    asyncio.run(saturated_call())
    assert all(r.kv_blocks_free == r.kv_blocks_total for r in wait_blocks_free(cluster).replicas)


def metric(cluster, name: str) -> float:
    """One unlabelled series of the frontend's /metrics."""
    return scrape(cluster)[name]


def running(cluster) -> float:
    """Requests admitted and not finished."""
    return metric(cluster, "tpserve_requests_running")


def aborted(cluster) -> float:
    return metric(cluster, "tpserve_requests_aborted_total")


def test_a_client_that_disconnects_frees_its_blocks_streamed_or_not(cluster):
    long = {"model": MODEL, "prompt": PROMPT, "max_tokens": 600, "temperature": 0, "ignore_eos": True}
    before = aborted(cluster)
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", cluster.http + "/v1/completions", json={**long, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        # (closing the stream closes the connection mid-response)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(cluster.http + "/v1/completions", json=long, timeout=1.5)
    deadline = time.monotonic() + 20
    while aborted(cluster) < before + 2:
        assert time.monotonic() < deadline, "a disconnected request was not aborted"
        time.sleep(0.1)
    st = wait_blocks_free(cluster)
    assert all(r.kv_blocks_free == r.kv_blocks_total and r.running == 0 for r in st.replicas)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed on this machine")
def test_curl_reads_the_stream_as_server_sent_events(cluster):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 6,
                       "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sN", "-H", "Content-Type: application/json", "-d", body,
                          cluster.http + "/v1/chat/completions"], capture_output=True, text=True, timeout=60).stdout
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 3
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    ref = grpc_greedy(cluster, 6, messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=QUESTION)]))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == ref.text


def test_health_answers_200_when_serving(cluster):
    r = httpx.get(cluster.http + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_tokenize_detokenize_and_one_model_as_vllm_serves_them(cluster, smollm2_reference):
    _, tok = smollm2_reference
    r = httpx.post(cluster.http + "/tokenize", json={"model": MODEL, "prompt": PROMPT}, timeout=30)
    assert r.status_code == 200 and r.json()["tokens"] == tok(PROMPT).input_ids
    assert r.json()["count"] == len(r.json()["tokens"]) and r.json()["max_model_len"] == 1024
    # Chat messages go through the chat template, as the chat endpoint sends them.
    chat = httpx.post(cluster.http + "/tokenize", json={"messages": [{"role": "user", "content": QUESTION}]},
                      timeout=30).json()
    assert chat["count"] == grpc_greedy(cluster, 1, messages=pb.ChatMessages(
        messages=[pb.ChatMessage(role="user", content=QUESTION)])).prompt_tokens
    back = httpx.post(cluster.http + "/detokenize", json={"model": MODEL, "tokens": r.json()["tokens"]}, timeout=30)
    assert back.status_code == 200 and back.json()["prompt"] == PROMPT
    for path, body, param in (("/detokenize", {"tokens": [10 ** 9]}, "tokens"),
                              ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "prompt"),
                              ("/tokenize", {"model": "other", "prompt": "x"}, "model")):
        bad = httpx.post(cluster.http + path, json=body, timeout=30)
        assert bad.status_code in (400, 404) and bad.json()["error"]["param"] == param, (path, bad.text)
    one = client(cluster).models.retrieve(MODEL)
    assert one.id == MODEL
    missing = httpx.get(cluster.http + "/v1/models/gpt-4", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_n_choices_share_one_prefill_and_each_draws_from_its_own_seed(cluster):
    """n samples of one prompt: choice j is what a single request seeded seed + j gives; choices
    after the first read the prompt's blocks from the prefix cache (one prefill)."""
    c = client(cluster)
    nonce = " ".join(f"a{i}" for i in range(int(time.time()) % 997, int(time.time()) % 997 + 40))
    prompt = f"Notes {nonce}. Once upon a time, in a quiet village by the sea, there lived"  # not cached before
    r = c.completions.create(model=MODEL, prompt=prompt, n=3, max_tokens=8, temperature=1.5, seed=7)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    singles = [c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.5, seed=7 + j)
               .choices[0].text for j in range(3)]
    assert [ch.text for ch in r.choices] == singles and len(set(singles)) > 1
    full_blocks = (r.usage.prompt_tokens - 1) // 16 * 16
    assert r.usage.completion_tokens == 24 and r.usage.total_tokens == r.usage.prompt_tokens + 24
    assert r.usage.prompt_tokens_details.cached_tokens >= 2 * full_blocks  # the two siblings at least
    # Streamed: every chunk names its choice; each choice's text is the unstreamed one.
    texts = {}
    finishes = {}
    for ch in c.completions.create(model=MODEL, prompt=prompt, n=3, max_tokens=8, temperature=1.5, seed=7,
                                   stream=True):
        for choice in ch.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert [texts[j] for j in range(3)] == singles and finishes == {0: "length", 1: "length", 2: "length"}
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}], n=2,
                                     max_tokens=6, temperature=0)
    assert [ch.index for ch in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy: the same answer


def test_batched_prompts_get_one_choice_each_in_order(cluster):
    c = client(cluster)
    greedy = dict(model=MODEL, max_tokens=6, temperature=0)
    prompts = [PROMPT, "Water boils at", QUESTION]
    single = [c.completions.create(prompt=p, **greedy) for p in prompts]
    singles = [r.choices[0].text for r in single]
    r = c.completions.create(prompt=prompts, **greedy)
    assert [ch.text for ch in r.choices] == singles and [ch.index for ch in r.choices] == [0, 1, 2]
    ids = [httpx.post(cluster.http + "/tokenize", json={"model": MODEL, "prompt": p}, timeout=60).json()["tokens"]
           for p in prompts]
    r = c.completions.create(prompt=ids, n=2, **greedy)  # choice i * n + j: prompt i's j-th
    assert [ch.index for ch in r.choices] == list(range(6))
    assert [ch.text for ch in r.choices] == [t for t in singles for _ in range(2)]
    assert r.usage.prompt_tokens == sum(len(i) for i in ids)
    assert r.usage.completion_tokens == 2 * sum(one.usage.completion_tokens for one in single)


def test_echo_and_prompt_logprobs_are_the_models_log_softmax(cluster, smollm2_reference):
    """lm-eval's loglikelihood request (echo, logprobs=1, max_tokens=1, a batch of token lists)
    scores each prompt token with transformers' log-softmax; vLLM's prompt_logprobs the same."""
    import torch

    model, tok = smollm2_reference
    texts = ["The quick brown fox jumps over the lazy dog", "Paris is the capital of"]
    batch = [tok(t)["input_ids"] for t in texts]
    body = {"model": MODEL, "prompt": batch, "temperature": 0, "max_tokens": 1, "logprobs": 1, "echo": True,
            "seed": 1234}
    r = httpx.post(cluster.http + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    for ids, choice in zip(batch, sorted(r.json()["choices"], key=lambda ch: ch["index"])):
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        lp = choice["logprobs"]
        assert choice["text"].startswith(tok.decode(ids)) and len(lp["tokens"]) == len(ids) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = [float(ref[p, ids[p + 1]]) for p in range(len(ids) - 1)]
        assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:len(ids)], want)) < 1e-3
        for p in range(1, len(ids)):  # the token itself and the top-1, as lm-eval's is_greedy reads them
            top = lp["top_logprobs"][p]
            assert lp["token_logprobs"][p] in top.values()
            assert max(top.values()) == pytest.approx(float(ref[p - 1].max()), abs=1e-3)
    r = httpx.post(cluster.http + "/v1/completions", json={"model": MODEL, "prompt": batch[1], "max_tokens": 2,
                                                             "temperature": 0, "prompt_logprobs": 2}, timeout=120)
    scored = r.json()["choices"][0]["prompt_logprobs"]
    ids = batch[1]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert scored[0] is None and len(scored) == len(ids)
    for p in range(1, len(ids)):
        entry = scored[p][str(ids[p])]
        assert entry["logprob"] == pytest.approx(float(ref[p - 1, ids[p]]), abs=1e-3)
        row, at = ref[p - 1], ref[p - 1, ids[p]]
        assert int((row > at + 1e-4).sum()) + 1 <= entry["rank"] <= int((row > at - 1e-4).sum()) + 1
        assert {int(t) for t in scored[p]} >= set(ref[p - 1].topk(2).indices.tolist())


def test_structured_outputs_through_the_openai_client(cluster):
    """A Pydantic model through the client's parse(); JSON mode, and vLLM's structured_outputs
    (choice, regex), streamed or not: the output always matches."""
    import jsonschema
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=16)
        country: str = Field(max_length=16)
        population_millions: int = Field(ge=0, le=100)

    c = client(cluster)
    r = c.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Describe Paris as JSON."}],
                                 response_format=City, max_tokens=96, temperature=0)
    city = r.choices[0].message.parsed
    assert isinstance(city, City) and r.choices[0].finish_reason == "stop"
    r = c.completions.create(model=MODEL, prompt="A small JSON object:", max_tokens=256, temperature=0,
                             extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].text), dict)
    r = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
                             extra_body={"structured_outputs": {"choice": ["Paris", "Lyon"]}})
    assert r.choices[0].text in ("Paris", "Lyon")
    schema = {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 99}, "maxItems": 3}},
              "required": ["ids"], "additionalProperties": False}
    text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Three numbers"}], max_tokens=64, temperature=1.0, seed=5,
        stream=True, response_format={"type": "json_schema", "json_schema": {"name": "ids", "schema": schema}})
        if ch.choices)
    jsonschema.validate(json.loads(text), schema)
    r = c.completions.create(model=MODEL, prompt="Code:", max_tokens=12, temperature=1.0, seed=1, n=2,
                             extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{4}"}})
    assert all(re.fullmatch("[A-Z]{2}-[0-9]{4}", ch.text) for ch in r.choices)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}


def test_tool_calls_named_and_required_streamed_or_not_as_the_openai_client_reads_them(cluster):
    import jsonschema

    c = client(cluster)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME], tool_choice=named,
                                  max_tokens=64, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (tc,) = choice.message.tool_calls
    assert tc.type == "function" and tc.function.name == "get_weather" and tc.id.startswith("call_")
    jsonschema.validate(json.loads(tc.function.arguments), WEATHER["function"]["parameters"])

    r = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME], tool_choice="required",
                                  max_tokens=96, temperature=0.7, seed=2, parallel_tool_calls=False)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    tool = {"get_weather": WEATHER, "get_time": TIME}[calls[0].function.name]
    jsonschema.validate(json.loads(calls[0].function.arguments), tool["function"]["parameters"])

    # Streamed: assembled by index as the client's examples do; the same call as unstreamed.
    for choice_arg, tokens in ((named, 64), ("required", 96)):
        ref = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME],
                                        tool_choice=choice_arg, max_tokens=tokens, temperature=0)
        parts: dict[int, dict] = {}
        finish = None
        for ch in c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME],
                                            tool_choice=choice_arg, max_tokens=tokens, temperature=0, stream=True):
            for d in ch.choices[0].delta.tool_calls or []:
                p = parts.setdefault(d.index, {"name": "", "arguments": ""})
                p["name"] += (d.function.name or "") if d.function else ""
                p["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = ch.choices[0].finish_reason or finish
        assert finish == "tool_calls"
        assert [(p["name"], json.loads(p["arguments"])) for _, p in sorted(parts.items())] == \
            [(t.function.name, json.loads(t.function.arguments)) for t in ref.choices[0].message.tool_calls]

    # The call and its result go back through the chat template; "none" answers in text.
    follow = messages + [{"role": "assistant", "content": None, "tool_calls": [tc.model_dump()]},
                         {"role": "tool", "tool_call_id": tc.id, "content": "18 C, sunny"}]
    r = c.chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER], tool_choice="none",
                                  max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content


def test_tool_choice_auto_parses_the_models_own_hermes_calls_whole_and_streamed(cluster):
    """The shared cluster runs with --enable-auto-tool-choice --tool-call-parser hermes. SmolLM2 was
    not tuned to call tools, so a regex (a structured output, which "auto" leaves free) holds its
    answer to a sentence and one hermes call: the parser must find the call in real model output,
    return the sentence as content, and stream the same."""
    c = client(cluster)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    regex = (r'Checking\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", '
             r'"unit": "celsius"\}\}</tool_call>')
    kw = dict(model=MODEL, messages=messages, tools=[WEATHER, TIME], tool_choice="auto", max_tokens=192,
              temperature=0, extra_body={"structured_outputs": {"regex": regex}})
    r = c.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking. ", choice
    (tc,) = choice.message.tool_calls
    args = json.loads(tc.function.arguments)
    assert tc.function.name == "get_weather" and args["unit"] == "celsius" and args["city"] in ("Paris", "Rome")

    content, parts, finish = "", {}, None
    for ch in c.chat.completions.create(**kw, stream=True):
        d = ch.choices[0].delta
        content += d.content or ""
        for t in d.tool_calls or []:
            p = parts.setdefault(t.index, {"name": "", "arguments": ""})
            p["name"] += t.function.name or ""
            p["arguments"] += t.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    assert content == "Checking. " and finish == "tool_calls"
    assert [(p["name"], json.loads(p["arguments"])) for p in parts.values()] == [("get_weather", args)]

    # Tools offered, "auto" by default, an answer in text: content, no calls.
    r = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=8, temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason in ("stop", "length")

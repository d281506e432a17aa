"""The harness's figures against a server with scripted timings, and its arrival schedules."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from scipy import stats as sstats

from cluster.bench.arrivals import arrival_times
from cluster.bench.metrics import summarize
from cluster.bench.runner import LoadSpec, run_load
from cluster.bench.workload import BenchRequest, WorkloadSpec, make_workload
from cluster.bench import scripted_server

N_TOKENS = 8


def requests(kinds: list[int]) -> list[BenchRequest]:
    return [BenchRequest([k, 1, 2, 3], "", N_TOKENS) for k in kinds]


async def run(kinds, slo, concurrency=4):
    server, port = await scripted_server.start(first_s=0.05, gap_s=0.01, slow_first_s=0.15)
    try:
        records, duration = await run_load(f"127.0.0.1:{port}", "tpserve", "fake", requests(kinds),
                                           LoadSpec(concurrency=concurrency))
    finally:
        await server.stop(0)
    return records, summarize(records, duration, slo)


def test_reported_latencies_match_the_scripted_server():
    records, s = asyncio.run(run([1] * 12, {"ttft": None, "tpot": None, "e2e": None}))
    tol = 8.0  # ms: asyncio timers on a shared 2-core machine
    assert s["completed"] == 12 and s["output_tokens"] == 12 * N_TOKENS
    assert abs(s["ttft"]["median_ms"] - 50) < tol
    assert abs(s["itl"]["median_ms"] - 10) < tol
    assert abs(s["tpot"]["median_ms"] - 10) < tol
    # e2e spans eight timer waits, each of which may overshoot on a loaded machine: a wider bound.
    assert abs(s["e2e"]["median_ms"] - (50 + 10 * (N_TOKENS - 1))) < 3 * tol
    # TPOT is (E2E - TTFT) / (tokens - 1), request by request
    r = records[0]
    assert r.tpot == pytest.approx((r.e2e - r.ttft) / (N_TOKENS - 1))


def test_goodput_counts_exactly_the_requests_meeting_every_slo_and_errors_by_status():
    kinds = [1] * 6 + [scripted_server.SLOW] * 3 + [scripted_server.REFUSE] * 2
    _, s = asyncio.run(run(kinds, {"ttft": 100.0, "tpot": 30.0, "e2e": None}))
    assert s["completed"] == 9 and s["errors_by_status"] == {"RESOURCE_EXHAUSTED": 2}
    assert s["goodput_requests"] == 6  # slow first tokens (150 ms) miss the 100 ms TTFT SLO
    _, s = asyncio.run(run(kinds, {"ttft": None, "tpot": None, "e2e": 100.0}))
    assert s["goodput_requests"] == 0  # every E2E is ~120 ms or more


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 2.0])
def test_arrival_schedule_has_the_asked_rate_and_distribution(burstiness):
    rate, n = 40.0, 4000
    t = arrival_times(n, rate, burstiness, seed=3)
    gaps = np.diff(t)
    assert abs((n - 1) / t[-1] - rate) / rate < 0.05
    ref = sstats.gamma(a=burstiness, scale=1 / (rate * burstiness))
    assert sstats.kstest(gaps, ref.cdf).pvalue > 0.01
    if burstiness != 1.0:  # and it is really not Poisson
        assert sstats.kstest(gaps, sstats.expon(scale=1 / rate).cdf).pvalue < 0.01
    assert np.array_equal(t, arrival_times(n, rate, burstiness, seed=3))  # seeded


def test_workloads_are_seeded_and_shaped():
    a = make_workload(WorkloadSpec("random", input_range=(10, 20), output_range=(3, 5)), 50, 1000, seed=1)
    b = make_workload(WorkloadSpec("random", input_range=(10, 20), output_range=(3, 5)), 50, 1000, seed=1)
    assert [r.prompt_ids for r in a] == [r.prompt_ids for r in b]
    assert all(10 <= len(r.prompt_ids) <= 20 and 3 <= r.output_len <= 5 for r in a)
    shared = make_workload(WorkloadSpec("shared-prefix", input_len=8, prefix_len=32), 5, 1000)
    assert len({tuple(r.prompt_ids[:32]) for r in shared}) == 1 and len({tuple(r.prompt_ids) for r in shared}) == 5
    tail = make_workload(WorkloadSpec("longtail", input_len=64, output_len=32), 2000, 1000)
    lens = np.array([len(r.prompt_ids) for r in tail])
    assert np.percentile(lens, 99) > 3 * np.median(lens)  # a long tail


def test_multi_tenant_and_conversation_workloads():
    mt = make_workload(WorkloadSpec("multi-tenant", input_range=(4, 8), output_range=(2, 3), prefix_len=40,
                                    tenants=3), 60, 1000, seed=2)
    assert {r.tenant for r in mt} == {0, 1, 2}
    for r in mt:  # every request of a tenant starts with that tenant's system prompt, and no other's
        assert r.prompt_ids[:40] == next(q for q in mt if q.tenant == r.tenant).prompt_ids[:40]
        assert 44 <= len(r.prompt_ids) <= 48
    assert len({tuple(r.prompt_ids[:40]) for r in mt}) == 3
    assert [r.tenant for r in mt[:12]] != sorted(r.tenant for r in mt[:12])  # interleaved, not grouped
    conv = make_workload(WorkloadSpec("conversation", input_range=(3, 5), output_range=(4, 4), turns=3), 7, 1000)
    assert len(conv) == 3 and all(len(r.follow_ups) == 2 for r in conv)  # ceil(7 / 3) sessions


def test_a_conversation_sends_each_turn_as_the_previous_prompt_plus_its_answer_plus_a_question():
    async def go():
        server, port = await scripted_server.start(first_s=0.01, gap_s=0.001)
        try:
            sessions = make_workload(WorkloadSpec("conversation", input_range=(3, 5), output_range=(4, 4), turns=3),
                                     6, 1000, seed=5)
            records, _ = await run_load(f"127.0.0.1:{port}", "tpserve", "fake", sessions, LoadSpec(concurrency=1))
            return sessions, records, server.servicer.prompts
        finally:
            await server.stop(0)

    sessions, records, prompts = asyncio.run(go())
    assert len(records) == 6 and all(r.ok for r in records)
    answer = [100, 101, 102, 103]  # what the scripted server answers
    for s, session in enumerate(sessions):
        turns = prompts[3 * s:3 * s + 3]
        assert turns[0] == session.prompt_ids
        assert turns[1] == turns[0] + answer + session.follow_ups[0]
        assert turns[2] == turns[1] + answer + session.follow_ups[1]


def test_a_salted_request_carries_its_cache_salt_in_the_openai_body_and_an_unsalted_one_none():
    """Two clients compared on the same requests each send their own salt, so neither reuses the
    other's prefix cache: the salt must reach the server's body (vLLM's `cache_salt` field)."""
    import json

    import httpx

    from cluster.bench.metrics import RequestRecord
    from cluster.bench.runner import OpenAIProtocol

    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        chunks = [{"choices": [{"text": "a"}]}, {"choices": [], "usage": {"completion_tokens": 1, "prompt_tokens": 3}}]
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://test") as client:
            proto = OpenAIProtocol(client, "m")
            for salt in ("aiperf-0", None):
                rec = RequestRecord()
                await proto.send(BenchRequest(None, "a b c", 1, cache_salt=salt), rec, 5.0)
                assert rec.output_tokens == 1 and rec.ttft is not None

    asyncio.run(go())
    assert bodies[0]["cache_salt"] == "aiperf-0" and bodies[0]["prompt"] == "a b c"
    assert "cache_salt" not in bodies[1]

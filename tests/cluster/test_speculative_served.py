"""Speculative decoding end to end: `tpserve serve --speculative-config` with SmolLM2, streamed over
gRPC, counted in GetClusterStatus and Prometheus, and reported by `tpserve bench`."""
from __future__ import annotations

import json

import pytest

from cluster.api.tpserve.v1 import tpserve_pb2 as pb
from tests.cluster.conftest import ServeProcess
from tests.cluster.helpers import scrape, stub
from tests.workers.reference import reference_greedy

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
PROMPT = ("Passage: The clock in the square struck noon, and the baker opened his shop. The clock in the square "
          "struck one, and the baker closed his shop.\nThe same passage again: The clock in the square")


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_dir):
    server = ServeProcess(["--model", "smollm2-135m", "--tp", "1", "--replicas", "1", "--kv-cache-memory",
                           str(32 << 20), "--max-model-len", "512", "--ray-num-cpus", "4",
                           "--speculative-config", json.dumps(NGRAM)], tmp_path_factory.mktemp("spec"))
    yield server
    server.terminate()


def test_greedy_stream_equals_transformers_and_proposals_were_accepted(served, smollm2_reference):
    model, tok = smollm2_reference
    ids = tok(PROMPT).input_ids
    ref = reference_greedy(model, ids, 24)
    req = pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParameters(max_tokens=24, temperature=0.0,
                                                                            ignore_eos=True))
    msgs = list(stub(served).Generate(req, timeout=120))
    assert [t for m in msgs for t in m.token_ids] == ref
    assert len(msgs) < 24  # some steps emitted several tokens
    st = stub(served).GetClusterStatus(pb.GetClusterStatusRequest(), timeout=30).replicas[0]
    assert 0 < st.spec_decode_num_accepted_tokens <= st.spec_decode_num_draft_tokens
    values = {k: v for k, v in scrape(served).items() if k.startswith("tpserve_spec")}
    accepted = [v for k, v in values.items() if k.startswith("tpserve_spec_decode_num_accepted_tokens_total")]
    assert accepted and accepted[0] >= st.spec_decode_num_accepted_tokens
    assert any(k.startswith("tpserve_spec_decode_mean_accepted_length") and v > 1 for k, v in values.items())


def test_bench_repetitive_workload_reports_acceptance(served, tmp_path):
    from cluster.bench.main import main as bench_main

    out = tmp_path / "r.json"
    rc = bench_main(["--target", served.target, "--workload", "repetitive", "--num-requests", "3", "--warmup", "0",
                     "--concurrency", "1", "--output-range", "12,16", "--out", str(out), "--no-progress"])
    assert rc == 0
    spec = json.loads(out.read_text())["runs"][0]["summary"]["speculative"]
    assert spec["draft_tokens"] > 0 and 0 < spec["acceptance_rate"] <= 1 and spec["mean_accepted_length"] > 1

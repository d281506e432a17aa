"""The engine on real worker groups (CPU, gloo): batching, preemption, prefix cache, sampling, aborts."""
from __future__ import annotations

import random
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.workers.reference import reference_greedy
from workers.engine.core import EngineConfig
from workers.engine.sampling_params import SamplingParams
from workers.errors import ConfigError
from workers.launcher import start_worker_group
from workers.worker import WorkerSpec

GREEDY16 = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def make_prompts(n: int, seed: int, lo: int = 4, hi: int = 60) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 251, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


PROMPTS = make_prompts(32, seed=3)


def start(folder, tp, kv_bytes=8 << 20, **engine):
    cfg = EngineConfig(**{"max_num_seqs": 64, "max_num_batched_tokens": 256, **engine})
    return start_worker_group(WorkerSpec(str(folder), tp_size=tp, kv_cache_memory=kv_bytes), cfg)


def tokens(group, prompts, params):
    return [c.token_ids for c in group.engine.generate(prompts, params)]


@pytest.fixture(scope="module")
def references(sharp_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(str(sharp_llama_dir), dtype=torch.float32).eval()
    return [reference_greedy(model, p, 16) for p in PROMPTS]


@pytest.fixture(scope="module", params=[1, 2], ids=lambda t: f"tp{t}")
def group(request, sharp_llama_dir):
    with start(sharp_llama_dir, request.param) as grp:
        yield grp


def test_greedy_is_batch_invariant_and_equals_transformers(group, references):
    alone = [tokens(group, [p], GREEDY16)[0] for p in PROMPTS]
    together = tokens(group, PROMPTS, GREEDY16)
    assert alone == references
    assert together == references


@pytest.mark.parametrize("path", ["always", "off"])
def test_both_decode_attention_paths_equal_transformers(references, sharp_llama_dir, monkeypatch, path):
    """The in-place paged decode kernel (always) and the gather path (off), pinned in the ranks'
    processes at tp 2 (a cut mid-group: 9 heads over 3 KV heads do not split evenly in 2)."""
    from workers.paged_decode_op import available

    if path == "always" and not available():
        pytest.skip("no C++ compiler here: only the gather path exists")
    monkeypatch.setenv("TPSERVE_PAGED_DECODE", path)
    with start(sharp_llama_dir, 2) as grp:
        assert tokens(grp, PROMPTS, GREEDY16) == references


def test_plain_layers_on_onednn_packed_weights_equal_transformers(references, sharp_llama_dir, monkeypatch):
    """Every plain layer multiplying on its oneDNN-packed weight (TPSERVE_ONEDNN=always, in the
    ranks' processes, at tp 2), prefill chunks and decode steps alike."""
    from workers.layers.linear_method import onednn_available

    if not onednn_available(torch.float32):
        pytest.skip("no oneDNN in this torch build")
    from cluster.planner.model_shape import ModelShape
    from workers.config import ModelConfig

    monkeypatch.setenv("TPSERVE_ONEDNN", "always")
    with start(sharp_llama_dir, 2) as grp:
        assert all(r["onednn_layers"] > 0 and r["onednn_bytes"] > 0 for r in grp.reports)
        assert tokens(grp, PROMPTS, GREEDY16) == references
        # The planner's memory model counts the packed copies (oneDNN pads little past the plain size).
        planned = ModelShape(ModelConfig.from_pretrained(sharp_llama_dir)).weight_bytes(2, "none", "float32")
        held = max(r["param_bytes"] + r["onednn_bytes"] for r in grp.reports)
        assert abs(planned / held - 1) < 0.05, (planned, held)


def test_continuous_batching_mixes_many_sequences_and_prefill_with_decode(group):
    before = group.engine.call("stats")
    long = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    first = [group.engine.add_request(p, long) for p in PROMPTS[:20]]
    deltas = iter(first[0])
    next(deltas)  # the first ones are decoding (47 tokens to go) when the rest arrive
    rest = [group.engine.add_request(p, GREEDY16) for p in PROMPTS[20:]]
    for _ in deltas:
        pass
    for s in first[1:] + rest:
        s.result()
    after = group.engine.call("stats")
    assert after.max_seqs_in_step >= 16
    assert after.mixed_steps > before.mixed_steps
    assert after.steps - before.steps < (20 * 48 + 12 * 16) / 4  # far fewer steps than tokens: they were batched


def test_seeded_sampling_is_reproducible_across_batches_and_runs(group):
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=s) for s in (1, 2, 3)]
    alone = [tokens(group, [PROMPTS[i]], params[i])[0] for i in range(3)]
    crowd = tokens(group, PROMPTS[:3] + PROMPTS[10:20], params + [GREEDY16] * 10)[:3]
    again = [tokens(group, [PROMPTS[i]], params[i])[0] for i in range(3)]
    assert alone == crowd == again
    other_seed = tokens(group, [PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0.9, seed=99))[0]
    assert other_seed != alone[0]


def test_prefix_cache_skips_the_shared_prefix_and_keeps_output(group):
    prompt = make_prompts(1, seed=11, lo=100, hi=101)[0]
    first = group.engine.generate([prompt], GREEDY16)[0]
    assert first.computed_prompt_tokens == len(prompt)
    second = group.engine.generate([prompt], GREEDY16)[0]
    assert second.token_ids == first.token_ids
    assert second.computed_prompt_tokens <= 16  # new tokens (0) + one block
    suffix = make_prompts(1, seed=12, lo=20, hi=21)[0]
    third = group.engine.generate([prompt[:96] + suffix], GREEDY16)[0]
    assert third.computed_prompt_tokens <= len(suffix) + 16
    assert third.cached_prompt_tokens >= 96 - 16


# Relative past 1: the sharp model's unlikely tokens score -40 or so, where float32 steps by 4e-6 and
# the fused CPU ops (workers/fused_ops.py) add their sums of squares in another order than PyTorch.
LOGPROB_TOL = 1e-4


def test_logprobs_are_the_models_log_softmax(group, sharp_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(str(sharp_llama_dir), dtype=torch.float32).eval()
    out = group.engine.generate([PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0, logprobs=3))[0]
    with torch.no_grad():
        ref = model(torch.tensor([PROMPTS[0] + out.token_ids])).logits[0].log_softmax(-1)
    n = len(PROMPTS[0])
    for i, lp in enumerate(out.logprobs):
        assert lp["token_id"] == out.token_ids[i]
        want = float(ref[n - 1 + i, lp["token_id"]])
        assert abs(lp["logprob"] - want) < LOGPROB_TOL * max(1.0, abs(want))
        assert [t for t, _ in lp["top"]] == ref[n - 1 + i].topk(3).indices.tolist()


def test_prompt_logprobs_are_the_models_log_softmax_over_chunks_and_cached_prefixes(group, sharp_llama_dir):
    """Every prompt token after the first is scored from the prefill's logits, also when the
    prompt's prefill is split over steps (two 200-token prompts in a 256-token budget) and when
    its prefix is cached (the request runs it anyway: the logits are the answer)."""
    model = AutoModelForCausalLM.from_pretrained(str(sharp_llama_dir), dtype=torch.float32).eval()
    prompts = make_prompts(2, seed=11, lo=200, hi=201)
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3)
    group.engine.generate([prompts[1][:160]], GREEDY16)  # caches most of the second prompt's prefix
    outs = group.engine.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
        assert out.computed_prompt_tokens == len(prompt) and len(out.prompt_logprobs) == len(prompt)
        assert out.prompt_logprobs[0] is None
        for p, lp in enumerate(out.prompt_logprobs[1:]):
            assert lp["token_id"] == prompt[p + 1]
            want = float(ref[p, prompt[p + 1]])
            assert abs(lp["logprob"] - want) < LOGPROB_TOL * max(1.0, abs(want))
            assert [t for t, _ in lp["top"]] == ref[p].topk(3).indices.tolist()
    # Without the field: nothing is scored, and the cached prefix serves as before.
    plain = group.engine.generate([prompts[1]], SamplingParams(max_tokens=2, temperature=0))[0]
    assert plain.prompt_logprobs is None and plain.cached_prompt_tokens >= 144


@pytest.mark.parametrize(("params", "field"), [
    (SamplingParams(temperature=-1.0), "temperature"),
    (SamplingParams(top_p=0.0), "top_p"),
    (SamplingParams(max_tokens=0), "max_tokens"),
    (SamplingParams(max_tokens=10_000), "max_tokens"),  # prompt + max_tokens beyond the context
])
def test_bad_parameters_fail_the_request_naming_the_field_and_engine_serves_on(group, params, field):
    with pytest.raises(ConfigError) as info:
        group.engine.generate([PROMPTS[0]], params)
    assert info.value.field == field
    assert tokens(group, [PROMPTS[1]], GREEDY16)[0] == tokens(group, [PROMPTS[1]], GREEDY16)[0]


def test_prompt_beyond_the_context_is_refused(group):
    with pytest.raises(ConfigError, match="prompt: 300 tokens; the context holds 256"):
        group.engine.generate([[5] * 300], GREEDY16)


# ---- a cache too small for the batch ---------------------------------------------------------------
def test_preemption_loses_nothing_and_changes_no_token(sharp_llama_dir, references):
    prompts = make_prompts(16, seed=5, lo=20, hi=50)
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True) if i % 2 else
              SamplingParams(max_tokens=24, temperature=0.8, seed=i, ignore_eos=True) for i in range(16)]
    with start(sharp_llama_dir, 2) as big:
        expected = tokens(big, prompts, params)
        assert big.engine.call("stats").preemptions == 0
    with start(sharp_llama_dir, 2, kv_bytes=20 * 4096) as small:  # 20 blocks; the batch needs ~60
        assert small.engine.call("info")["num_blocks"] == 20
        done = small.engine.generate(prompts, params)
        stats = small.engine.call("stats")
    assert stats.preemptions > 0 and sum(c.num_preemptions for c in done) > 0
    assert [c.token_ids for c in done] == expected
    assert stats.free_blocks == stats.num_blocks


# ---- aborts ------------------------------------------------------------------------------------------
def test_500_requests_with_random_aborts_return_every_block(sharp_llama_dir):
    rng = random.Random(0)
    with start(sharp_llama_dir, 1, kv_bytes=2 << 20) as grp:
        streams, aborted = [], 0
        for i in range(500):
            p = make_prompts(1, seed=1000 + i, lo=2, hi=40)[0]
            streams.append(grp.engine.add_request(p, SamplingParams(max_tokens=rng.randint(1, 8), ignore_eos=True,
                                                                    temperature=rng.choice([0.0, 1.0]))))
            if rng.random() < 0.3:
                victim = rng.choice(streams)
                grp.engine.abort(victim.request_id)
                aborted += 1
            if i % 50 == 0:
                time.sleep(0.01)
        reasons = [s.result().finish_reason for s in streams]
        stats = grp.engine.call("stats")
    assert set(reasons) <= {"length", "abort"} and reasons.count("abort") > 20
    assert stats.running == 0 and stats.waiting == 0
    assert stats.free_blocks == stats.num_blocks

"""Speculative decoding (workers/engine/speculative.py): output equal to decoding without it, the
cache rolled back past rejected proposals, the pause rule, the flag's errors."""
from __future__ import annotations

import json

import pytest
import torch

from workers.engine.core import EngineConfig, EngineCore
from workers.engine.draft import DraftProposer
from workers.engine.executor import WorkerExecutor
from workers.engine.sampling_params import SamplingParams
from workers.engine.speculative import NgramIndex, NgramProposer, SpeculativeConfig, Speculator, SpecTrack
from workers.errors import ConfigError
from workers.launcher import start_worker_group
from workers.worker import Worker, WorkerSpec

# min_acceptance 0 and the cost rule off: keep proposing (the tiny random model rarely repeats
# itself, so most proposals are rejected: the rollback path); the draft that agrees covers long
# accepted runs.
NGRAM = SpeculativeConfig("ngram", 4, prompt_lookup_max=3, prompt_lookup_min=1, max_batch=64, min_acceptance=0.0,
                          adaptive=False)


def prompts(n: int, seed: int, repetitive: bool = True) -> list[list[int]]:
    """Repetitive prompts (a phrase said again) give the lookup something to find."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        phrase = torch.randint(3, 251, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        tail = torch.randint(3, 251, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        out.append(phrase * 3 + tail if repetitive else tail + phrase)
    return out


PROMPTS = prompts(12, seed=5)


@pytest.fixture(scope="module")
def worker(sharp_llama_dir):
    return Worker(WorkerSpec(str(sharp_llama_dir), kv_cache_memory=4 << 20), 0)


@pytest.fixture(scope="module", params=["ngram", "draft"])
def spec_engine(request, tiny_llama_dir):
    """A factory of speculating engines: n-gram lookup, or a draft model that agrees with the
    target (the tiny Llama is the sharp one before its LM head was scaled: the same argmax)."""
    if request.param == "ngram":
        return lambda worker, **cfg: engine(worker, NGRAM, **cfg)
    return lambda worker, **cfg: draft_engine(worker, tiny_llama_dir, **cfg)


def engine(worker, speculative=None, proposer=None, **cfg) -> EngineCore:
    config = EngineConfig(**{"max_num_seqs": 64, "max_num_batched_tokens": 256, **cfg}, speculative=speculative)
    return EngineCore(WorkerExecutor(worker), None, config, proposer)


def run(core: EngineCore, prompts, params) -> list[list[int]]:
    plist = params if isinstance(params, list) else [params] * len(prompts)
    got: dict[str, list[int]] = {}
    ids = [f"r{i}-{id(core)}" for i in range(len(prompts))]
    for rid, p, sp in zip(ids, prompts, plist):
        core.add_request(rid, p, sp)
        got[rid] = []
    while core.has_work():
        for out in core.step():
            assert out.finish_reason != "error", out.error
            got[out.request_id] += out.new_token_ids
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks  # nothing leaked
    return [got[r] for r in ids]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def test_greedy_equals_decoding_without_speculation_and_proposals_were_accepted(worker, spec_engine):
    want = run(engine(worker), PROMPTS, greedy(40))
    core = spec_engine(worker)
    got = run(core, PROMPTS, greedy(40))
    assert got == want
    st = core.snapshot()
    # The test means something only if proposals were verified and some accepted.
    assert st.spec_draft_tokens > 0 and st.spec_accepted_tokens > 0
    assert st.generated_tokens == 40 * len(PROMPTS)


def test_one_at_a_time_and_batched_alike(worker, spec_engine):
    core = spec_engine(worker)
    alone = [run(core, [p], greedy(24))[0] for p in PROMPTS[:4]]
    assert alone == run(engine(worker), PROMPTS[:4], greedy(24))


def test_seeded_sampling_gives_the_same_text_with_and_without_speculation(worker, spec_engine):
    params = [SamplingParams(max_tokens=32, temperature=t, top_p=p, top_k=k, seed=100 + i, ignore_eos=True)
              for i, (t, p, k) in enumerate([(0.7, 1.0, 0), (1.0, 0.9, 0), (0.5, 1.0, 20), (1.3, 0.95, 50)] * 3)]
    want = run(engine(worker), PROMPTS, params)
    core = spec_engine(worker)
    assert run(core, PROMPTS, params) == want
    assert core.snapshot().spec_accepted_tokens > 0


def test_sampling_keeps_the_target_distribution(worker, spec_engine):
    """First and 8th token of one prompt over many independent draws: the frequencies with and
    without speculation differ by no more than two honest runs without it do."""
    prompt = PROMPTS[0]
    n = 160

    def freqs(core, first_seed):
        # Each run its own seeds: independent draws (an engine's own seeds for unseeded requests
        # repeat from engine to engine, which would make every run draw the same tokens).
        params = [SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True, seed=first_seed + i)
                  for i in range(n)]
        outs = run(core, [prompt] * n, params)
        return [torch.bincount(torch.tensor([o[i] for o in outs]), minlength=251).float() / n for i in (0, 7)]

    def tv(a, b):
        return [0.5 * float((x - y).abs().sum()) for x, y in zip(a, b)]

    base_a, base_b = freqs(engine(worker), 0), freqs(engine(worker), 10_000)
    core = spec_engine(worker)
    spec = freqs(core, 20_000)
    honest = tv(base_a, base_b)
    assert core.snapshot().spec_draft_tokens > 0
    assert max(honest) > 0  # the runs are independent draws (the first token is nearly certain)
    for got, ref in zip(tv(spec, base_a), honest):
        assert got <= max(2 * ref, 0.15)


def test_finish_rules_apply_to_accepted_tokens_exactly(worker, spec_engine):
    want = run(engine(worker), PROMPTS, greedy(40))
    # A stop id that greedy decoding reaches mid-output: the output ends at it, as without.
    stops = [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop_token_ids=[w[17]]) for w in want]
    got = run(spec_engine(worker), PROMPTS, stops)
    for g, w in zip(got, want):
        assert g == w[:w.index(w[17]) + 1]
    for n in (1, 2, 5, 7):  # max_tokens never overshoots, whatever K
        assert run(spec_engine(worker), PROMPTS[:3], greedy(n)) == [w[:n] for w in want[:3]]


def test_logprobs_and_penalties_see_the_proposals_as_output(worker, spec_engine):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2, repetition_penalty=1.3,
                            frequency_penalty=0.4)
    a, b = engine(worker), spec_engine(worker)
    outs_a, outs_b = {}, {}
    for core, outs in ((a, outs_a), (b, outs_b)):
        for i, p in enumerate(PROMPTS[:6]):
            core.add_request(f"q{i}", p, params)
        while core.has_work():
            for o in core.step():
                outs.setdefault(o.request_id, []).extend(o.logprobs or [])
    assert [[x["token_id"] for x in outs_a[k]] for k in sorted(outs_a)] == \
           [[x["token_id"] for x in outs_b[k]] for k in sorted(outs_b)]
    for k in outs_a:
        for x, y in zip(outs_a[k], outs_b[k]):
            assert x["logprob"] == pytest.approx(y["logprob"], abs=1e-4)
            assert [t for t, _ in x["top"]] == [t for t, _ in y["top"]]


def test_rejected_proposals_are_rolled_back_in_blocks_and_prefix_cache(worker, spec_engine):
    # The references first: engines on one Worker share its KV memory, so another engine's run
    # would overwrite the blocks `core` caches.
    outs = run(engine(worker), PROMPTS[:6], greedy(45))
    follow = [p + o for p, o in zip(PROMPTS[:6], outs)]
    want = run(engine(worker), follow, greedy(12))
    core = spec_engine(worker)
    assert run(core, PROMPTS[:6], greedy(45)) == outs
    bm = core.block_manager
    # Every block the prefix cache can find holds the request's own accepted tokens.
    full = {tuple(p + o) for p, o in zip(PROMPTS[:6], outs)}
    for bid in bm.hash_to_block.values():
        blk = bm.blocks[bid]
        assert any(tuple(seq[i:i + bm.block_size]) == blk.token_ids
                   for seq in full for i in range(0, len(seq) - bm.block_size + 1, bm.block_size))
    # A follow-up that shares prompt + output hits the cache and continues as decoding alone would.
    before = core.block_manager.stats.prefix_hit_tokens
    assert run(core, follow, greedy(12)) == want
    assert core.block_manager.stats.prefix_hit_tokens - before >= 6 * bm.block_size


def test_preemption_with_proposals_in_a_small_cache(sharp_llama_dir, spec_engine):
    small = Worker(WorkerSpec(str(sharp_llama_dir), kv_cache_memory=40 * 16 * 2 * 3 * 8 * 4 * 2), 0)
    want = run(engine(small), PROMPTS, greedy(40))
    core = spec_engine(small)
    assert run(core, PROMPTS, greedy(40)) == want
    assert core.snapshot().preemptions > 0 and core.snapshot().spec_accepted_tokens > 0


def test_sliding_window_attention_verifies_like_it_decodes(tiny_mistral_dir):
    w = Worker(WorkerSpec(str(tiny_mistral_dir), kv_cache_memory=4 << 20), 0)
    want = run(engine(w), PROMPTS, greedy(40))
    core = engine(w, NGRAM)
    assert run(core, PROMPTS, greedy(40)) == want
    assert core.snapshot().spec_accepted_tokens > 0


DRAFTS: dict[str, Worker] = {}


def draft_engine(worker, draft_dir, k: int = 3, **cfg) -> EngineCore:
    sc = SpeculativeConfig("draft_model", k, model=str(draft_dir), max_batch=64, adaptive=False)
    if str(draft_dir) not in DRAFTS:  # one draft Worker per model for the module (its cache is the proposer's)
        DRAFTS[str(draft_dir)] = Worker(WorkerSpec(str(draft_dir), kv_cache_memory=2 << 20), 0)
    return engine(worker, sc, proposer=DraftProposer(sc, DRAFTS[str(draft_dir)], worker.config.vocab_size), **cfg)


def test_a_draft_model_that_agrees_is_accepted_and_one_that_does_not_changes_nothing(worker, tiny_llama_dir,
                                                                                      tiny_mistral_dir):
    want = run(engine(worker), PROMPTS, greedy(30))
    # The tiny Llama is the sharp one before its LM head was scaled: the same argmax everywhere.
    agree = draft_engine(worker, tiny_llama_dir)
    assert run(agree, PROMPTS, greedy(30)) == want
    st = agree.snapshot()
    assert st.spec_accepted_tokens >= 0.9 * st.spec_draft_tokens > 0
    other = draft_engine(worker, tiny_mistral_dir)  # another random model with the same vocabulary
    assert run(other, PROMPTS, greedy(30)) == want
    st = other.snapshot()
    assert st.spec_draft_tokens > 0 and st.spec_accepted_tokens < 0.5 * st.spec_draft_tokens
    # Its proposals keep failing: paused, so it proposed far fewer tokens than it could have.
    assert st.spec_paused > 0


def test_a_draft_with_another_vocabulary_is_refused_naming_both(tiny_llama_dir):
    cfg = SpeculativeConfig("draft_model", 3, model=str(tiny_llama_dir))
    draft = Worker(WorkerSpec(str(tiny_llama_dir), kv_cache_memory=1 << 20), 0)
    with pytest.raises(ConfigError) as e:
        DraftProposer(cfg, draft, 49152, "the target smollm2")
    assert e.value.field == "speculative-config.model" and "251" in str(e.value) and "49152" in str(e.value)


def test_tensor_parallel_ranks_verify_the_same_tokens(sharp_llama_dir, tiny_llama_dir):
    spec = WorkerSpec(str(sharp_llama_dir), tp_size=2, kv_cache_memory=4 << 20)
    outs, stats = {}, {}
    draft = SpeculativeConfig("draft_model", 3, model=str(tiny_llama_dir), max_batch=64, adaptive=False)
    for name, sc in (("none", None), ("ngram", NGRAM), ("draft", draft)):
        with start_worker_group(spec, EngineConfig(max_num_seqs=64, max_num_batched_tokens=256, speculative=sc)) as g:
            outs[name] = [c.token_ids for c in g.engine.generate(PROMPTS, greedy(40))]
            stats[name] = g.engine.call("stats")
    assert outs["ngram"] == outs["none"] and outs["draft"] == outs["none"]
    assert stats["ngram"].spec_accepted_tokens > 0 and stats["draft"].spec_accepted_tokens > 0


def test_under_load_no_sequence_speculates(worker):
    core = engine(worker, SpeculativeConfig("ngram", 4, prompt_lookup_min=1, max_batch=4, adaptive=False))
    run(core, PROMPTS, greedy(8))  # 12 decoding at once: above max_batch until the last few
    many = core.snapshot().spec_drafts
    core = engine(worker, SpeculativeConfig("ngram", 4, prompt_lookup_min=1, max_batch=64, adaptive=False))
    run(core, PROMPTS, greedy(8))
    assert many < core.snapshot().spec_drafts


def test_a_request_whose_proposals_keep_failing_is_paused():
    sp = Speculator(SpeculativeConfig("ngram", 4, min_acceptance=0.5, backoff_steps=10), NgramProposer(NGRAM))
    sp.tracks["a"] = SpecTrack()
    for _ in range(4):
        sp.verified("a", 4, 0)
    assert sp.stats.num_paused == 1 and sp.tracks["a"].paused_until == sp.step_no + 10
    for _ in range(4):
        sp.verified("a", 4, 4)
    assert sp.stats.num_paused == 1  # accepted again: not paused
    assert sp.stats.num_draft_tokens == 32 and sp.stats.num_accepted_tokens == 16


def costed(steps: dict[int, float], hits: dict[str, tuple[float, float]], **cfg) -> Speculator:
    """A speculator whose decode steps measured `steps` (rows -> seconds) and whose requests have
    `hits` (request id -> (accepted tokens, verifies that rejected one))."""
    sp = Speculator(SpeculativeConfig("ngram", 4, **cfg), NgramProposer(NGRAM))
    for rows, seconds in steps.items():
        sp.timed(rows, seconds)
    for rid, (h, m) in hits.items():
        sp.tracks[rid] = SpecTrack(hits=h, misses=m)
    return sp


def test_the_cost_rule_speculates_where_the_measured_step_says_it_pays():
    """fp32 here: a 5-row verify step 2.4x a 1-row step, so a request accepted ~15% of the time is
    not proposed to (it would cost ~23%) while one accepted ~85% is, at K 4. With the int kernels
    (5 rows 1.1x) the same poor request still pays, at the K with the most tokens per second."""
    fp32 = {1: 0.050, 2: 0.075, 5: 0.120}  # SmolLM2 fp32 at 1, 2 and 5 rows (docs/benchmarks.md)
    sp = costed(fp32, {"poor": (1, 10), "good": (43, 7)})
    assert sp.worth(1, {"poor": 4}, sp.costs.table(sp.step_no)) == {}
    assert sp.stats.num_declined == 1
    assert sp.worth(1, {"good": 4}, sp.costs.table(sp.step_no)) == {"good": 4}
    # p = (1 + 2 x 0.5) / 13 = 0.154: k 1 gives 1.154 tokens in 51.25 ms, k 2 1.178 in 52.5 ms.
    sp = costed({1: 0.050, 5: 0.055}, {"poor": (1, 10)})
    assert sp.worth(1, {"poor": 4}, sp.costs.table(sp.step_no)) == {"poor": 1}
    # Two decoding, steps linear in rows: only the good one's proposals pay (62 tokens/s against
    # 49 with both and 40 with none).
    sp = costed({2: 0.050, 10: 0.100}, {"poor": (1, 10), "good": (43, 7)})
    assert sp.worth(2, {"poor": 4, "good": 4}, sp.costs.table(sp.step_no)) == {"good": 4}
    # Not measured yet (here: the full step): everything is proposed, so it gets measured.
    assert sp.worth(2, {"poor": 4, "good": 6}, sp.costs.table(sp.step_no)) == {"poor": 4, "good": 6}


def test_a_declined_request_is_reconsidered_as_its_history_fades():
    sp = costed({1: 0.050, 5: 0.120}, {"poor": (1, 12)}, backoff_steps=4)
    for _ in range(3):
        sp.worth(1, {"poor": 4}, sp.costs.table(sp.step_no))
    assert (sp.tracks["poor"].hits, sp.tracks["poor"].misses) == (1, 12)
    sp.worth(1, {"poor": 4}, sp.costs.table(sp.step_no))
    assert (sp.tracks["poor"].hits, sp.tracks["poor"].misses) == (0.5, 6)  # halved: the prior weighs more


def test_step_costs_are_medians_interpolated_and_expire():
    from workers.engine.step_costs import StepCosts

    c = StepCosts(window=3, expire_steps=10)
    for s in (0.05, 0.09, 0.06, 0.07):  # the window keeps the last 3
        c.record(1, s, step_no=0)
    c.record(5, 0.15, step_no=5)
    t = c.table(step_no=10)
    assert t.step(1) == 0.07 and t.step(5) == 0.15 and abs(t.step(3) - 0.11) < 1e-12
    assert t.step(6) is None  # past what was measured: unknown, not extrapolated
    assert c.table(step_no=11).step(1) is None and c.table(step_no=11).step(5) == 0.15  # expired


def test_the_engine_times_its_decode_only_steps(worker):
    """One request alone: its decode and verify steps are timed by their rows (1 to K + 1), its
    prefill (30 tokens or more) is not."""
    core = engine(worker, SpeculativeConfig("ngram", 4, prompt_lookup_min=1))
    prompt = PROMPTS[0] * 3  # 30 tokens or more
    run(core, [prompt], greedy(24))
    rows = set(core.speculator.costs._steps)
    assert 1 in rows and rows <= set(range(1, 6))


def test_ngram_lookup_proposes_what_followed_the_latest_earlier_occurrence():
    idx = NgramIndex(1, 3)
    assert idx.propose([5, 6, 7, 8, 5, 6], 3) == [7, 8, 5]
    assert idx.propose([5, 6, 7, 8, 5, 6, 9], 3) == []  # 9 never occurred before
    assert idx.propose([5, 6, 7, 8, 5, 6, 9, 5, 6, 9, 1, 5, 6], 2) == [9, 1]  # latest "5 6" wins
    # The longest suffix wins over a more recent shorter one.
    assert NgramIndex(1, 3).propose([1, 2, 3, 4, 9, 3, 7, 1, 2, 3], 2) == [4, 9]
    assert NgramIndex(2, 3).propose([1, 2, 3, 9, 3], 2) == []  # one token matches: below the min


@pytest.mark.parametrize("text, key", [
    ("{", "speculative-config"),
    ("[1]", "speculative-config"),
    ('{"num_speculative_tokens": 3}', "speculative-config.method"),
    ('{"method": "ngram"}', "speculative-config.num_speculative_tokens"),
    ('{"method": "eagle9", "num_speculative_tokens": 3}', "speculative-config.method"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "speculative-config.num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": 2.5}', "speculative-config.num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 1, "prompt_lookup_min": 2}',
     "speculative-config.prompt_lookup_max"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "lookahead": 2}', "speculative-config.lookahead"),
    ('{"method": "draft_model", "num_speculative_tokens": 3}', "speculative-config.model"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "min_acceptance": 2}', "speculative-config.min_acceptance"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "adaptive": "yes"}', "speculative-config.adaptive"),
])
def test_bad_config_names_the_key(text, key):
    with pytest.raises(ConfigError) as e:
        SpeculativeConfig.parse(text)
    assert e.value.field == key


def test_cli_refuses_bad_config_in_one_line(capsys, tiny_llama_dir):
    from cluster.cli import main

    rc = main(["generate", "--model", str(tiny_llama_dir), "--prompt", "x",
               "--speculative-config", json.dumps({"method": "ngram", "num_speculative_tokens": -1})])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "speculative-config.num_speculative_tokens" in err

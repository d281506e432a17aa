"""No request kills the engine: every value `validate()` accepts samples and detokenizes, and a
request whose own data still breaks a step fails alone, naming itself, while the others go on."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.engine.core import EngineConfig
from workers.engine.detokenizer import Detokenizer
from workers.engine.loop import EARLY_ABORT_TTL_S, EngineLoop
from workers.engine.messages import AbortRequest, AddRequest
from workers.engine.sampler import sample, sample_each
from workers.engine.sampling_params import SamplingError, SamplingParams
from workers.engine.sequence import Sequence
from workers.errors import ConfigError, RequestFailed
from workers.launcher import start_worker_group
from workers.worker import WorkerSpec

VOCAB = 49152  # SmolLM2's, so the detokenizer below sees every id the sampler can return

# The whole domain of each field: ints far past int64, floats from subnormal to inf and NaN, and
# text with lone surrogates (JSON's "\ud800" reaches us as such a str).
BIG_INTS = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([2**63, 2**63 - 1, 2**64, -2**63, 2**31, VOCAB,
                                                                   VOCAB + 1, 0, -1]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([5e-324, 1e-300, 1e-6, 1e-5, 1e300, 1.7976931348623157e308, 0.0, -0.0]))
TEXT = st.text(alphabet=st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=12)


# Each field: its edges inside the accepted range, or anything at all (so about a third of the
# examples pass validation and reach the sampler with values at the edges of what it accepts).
INSIDE = {
    "max_tokens": st.sampled_from([1, 2, 2**31 - 1]), "top_k": st.sampled_from([-1, 0, 1, 2, VOCAB - 1, VOCAB]),
    "seed": st.sampled_from([0, 1, 2**63 - 1]), "logprobs": st.sampled_from([0, 1, 20]),
    "temperature": st.sampled_from([0.0, 5e-324, 1e-5, 0.7, 2.0, 1e30, 1.7976931348623157e308]),
    "top_p": st.sampled_from([5e-324, 1e-9, 0.5, 1.0]), "min_p": st.sampled_from([0.0, 1e-300, 0.5, 1.0]),
    "repetition_penalty": st.sampled_from([0.01, 0.5, 1.0, 2.0, 100.0]),
    "presence_penalty": st.sampled_from([-2.0, 0.0, 2.0]), "frequency_penalty": st.sampled_from([-2.0, 0.0, 2.0]),
}
ANY = {name: BIG_INTS if name in ("max_tokens", "top_k", "seed", "logprobs") else FLOATS for name in INSIDE}


@st.composite
def any_params(draw) -> SamplingParams:
    p = SamplingParams()
    for name in INSIDE:
        choice = draw(st.integers(0, 9))
        if choice < 4:
            setattr(p, name, draw(INSIDE[name]))
        elif choice == 4:
            setattr(p, name, draw(ANY[name]))
    if draw(st.booleans()):
        p.stop = draw(st.lists(TEXT, max_size=3))
    if draw(st.booleans()):
        p.cache_salt = draw(TEXT)
    if draw(st.booleans()):
        p.stop_token_ids = draw(st.lists(st.one_of(st.integers(0, VOCAB - 1), BIG_INTS), max_size=3))
    return p


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=any_params(), logit_scale=st.sampled_from([1.0, 30.0, 1e4]), data=st.data())
def test_whatever_validate_accepts_samples_and_detokenizes(tok, params, logit_scale, data):
    try:
        params.validate(VOCAB)
    except SamplingError as e:
        assert e.field.split("[")[0] in SamplingParams.__slots__ and e.message  # refused, naming the field
        return
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    logits = torch.randn(2, VOCAB, generator=g) * logit_scale
    seqs = [Sequence(f"r{i}", [1, 2, 3, 2], params, output_token_ids=[5, 5, 7]) for i in range(2)]
    for s in seqs:
        s.seed = params.seed if params.seed is not None else 1234
    results = sample(logits, seqs)
    for r in results:
        assert 0 <= r.token_id < VOCAB
        if params.logprobs is not None:
            assert math.isfinite(r.logprob) or r.logprob == -math.inf
    d = Detokenizer(tok)
    state = d.start(seqs[0].prompt_token_ids, params.stop)
    ids = list(seqs[0].all_token_ids)
    for r in results:
        ids.append(r.token_id)
        d.add_token(state, ids)
    d.take_delta(state, final=True)


def test_temperatures_below_1e_5_are_greedy_and_never_nan():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    for t in (5e-324, 1e-300, 9.9e-6):
        p = SamplingParams(temperature=t).validate(4)
        s = Sequence("r", [0], p)
        s.seed = 1
        assert p.greedy and sample(logits, [s])[0].token_id == 1


def test_inf_logits_fall_back_to_the_argmax_instead_of_nan():
    logits = torch.tensor([[1.0, float("inf"), float("inf"), 0.0]])  # softmax: NaN everywhere
    s = Sequence("r", [0], SamplingParams(temperature=1.0).validate(4))
    s.seed = 3
    assert sample(logits, [s])[0].token_id == 1


@pytest.mark.parametrize(("field", "value"), [
    ("top_k", 10**19), ("top_k", VOCAB + 1), ("max_tokens", 2**63), ("seed", 2**64),
    ("repetition_penalty", 1e-300), ("repetition_penalty", 1e300), ("logprobs", 10**19),
])
def test_extreme_integers_and_penalties_are_refused_naming_the_field(field, value):
    with pytest.raises(SamplingError) as info:
        SamplingParams(**{field: value}).validate(VOCAB)
    assert info.value.field == field


@pytest.mark.parametrize("params", [SamplingParams(stop=["ok", "\ud800"]), SamplingParams(cache_salt="a\udfffb")])
def test_lone_surrogates_are_refused_naming_the_field(params):
    with pytest.raises(SamplingError) as info:
        params.validate(VOCAB)
    assert info.value.field in ("stop[1]", "cache_salt") and "surrogate" in info.value.message


# ---- containment: a request that breaks a step fails alone ------------------------------------------
class PoisonTopK(SamplingParams):
    """Valid when checked, then a top_k the sampler cannot use: what a validation gap (or a bug in
    a field's conversion) would let through."""

    def validate(self, vocab_size=None):
        super().validate(vocab_size)
        self.top_k = "2**64"
        return self


class PoisonSalt(SamplingParams):
    """A salt the block-key hash cannot encode, past validation."""

    def validate(self, vocab_size=None):
        super().validate(vocab_size)
        self.cache_salt = "\ud800"
        return self


GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 9, 11, 40, 2], [17, 3, 3, 8], [100, 101, 102]]


@pytest.fixture(scope="module")
def engine(sharp_llama_dir):
    with start_worker_group(WorkerSpec(str(sharp_llama_dir), kv_cache_memory=8 << 20),
                            EngineConfig(max_num_seqs=8, max_num_batched_tokens=128)) as grp:
        yield grp.engine


@pytest.mark.parametrize("poison", [PoisonTopK(max_tokens=6, temperature=1.0),
                                    PoisonSalt(max_tokens=6, temperature=0.0, ignore_eos=True)],
                         ids=["top_k_overflow", "salt_surrogate"])
def test_a_request_that_breaks_its_step_fails_alone_and_the_batch_goes_on(engine, poison):
    want = [c.token_ids for c in engine.generate(PROMPTS, GREEDY)]
    streams = [engine.add_request(p, GREEDY) for p in PROMPTS[:2]]
    bad = engine.add_request([7, 8, 9, 10], poison, request_id="poison-1")
    streams.append(engine.add_request(PROMPTS[2], GREEDY))
    with pytest.raises(RequestFailed, match="request poison-1 failed in the engine"):
        bad.result()
    assert [s.result().token_ids for s in streams] == want  # the batch it shared is unchanged
    assert engine.dead is None and engine.call("stats").failed >= 1
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == want  # and it serves on


def test_a_refused_request_can_be_retried_with_its_own_id(engine):
    """A client lowers max_tokens and retries with its own id after a refusal (and a late abort of
    the refused one, as a frontend's cleanup sent): it gets its tokens, not an empty ABORT."""
    with pytest.raises(ConfigError):
        engine.add_request([5, 6], SamplingParams(max_tokens=10**6), request_id="again").result()
    engine.abort("again")
    engine.call("stats")  # the abort has been handled
    retry = engine.add_request([5, 6], GREEDY, request_id="again").result()
    assert retry.finish_reason == "length" and len(retry.token_ids) == GREEDY.max_tokens


def test_an_early_abort_record_expires(sharp_llama_dir, monkeypatch):
    """An abort that overtook its add refuses that add; one older than the TTL does not."""
    import workers.engine.loop as loop_mod

    clock = [1000.0]
    monkeypatch.setattr(loop_mod.time, "monotonic", lambda: clock[0])

    class FakeEngine:
        live: dict = {}
        added = []

        def abort(self, rid):
            return None

        def add_request(self, rid, *a):
            self.added.append(rid)

    lp = EngineLoop.__new__(EngineLoop)
    lp.engine, lp._early_aborts, lp._owners, lp._added, lp._finished = FakeEngine(), {}, {}, {}, {}
    outputs: list = []
    lp._handle(AbortRequest("a"), outputs)
    lp._handle(AddRequest("a", [1], GREEDY, client_id="c", seq=1), outputs)  # at once: refused
    assert [o.finish_reason for o in outputs] == ["abort"] and FakeEngine.added == []
    lp._handle(AbortRequest("b"), outputs)
    clock[0] += EARLY_ABORT_TTL_S + 1
    lp._handle(AddRequest("b", [1], GREEDY, client_id="c", seq=2), outputs)  # a retry much later: served
    assert FakeEngine.added == ["b"] and len(outputs) == 1
    assert lp._added == {"c": 2}


def test_sample_each_names_the_row_that_failed():
    ok = SamplingParams(temperature=1.0).validate(8)
    bad = SamplingParams(temperature=1.0).validate(8)
    bad.top_k = "2**64"
    seqs = [Sequence("fine", [1], ok), Sequence("broken", [1], bad)]
    for s in seqs:
        s.seed = 5
    out = sample_each(torch.randn(2, 8), seqs)
    assert 0 <= out[0].token_id < 8
    assert out[1].request_id == "broken" and "broken" in str(out[1])

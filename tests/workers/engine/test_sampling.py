"""Sampler and parameter validation on crafted logits (no model)."""
import math

import pytest
import torch

from workers.engine.sampler import sample, token_seed
from workers.engine.sampling_params import SamplingError, SamplingParams
from workers.engine.sequence import Sequence


def seqs(*params, prompt=(1, 2, 3)):
    return [Sequence(f"r{i}", list(prompt), p) for i, p in enumerate(params)]


def draw_many(logits, params, n=400):
    out = []
    for i in range(n):
        s = seqs(SamplingParams(**params, seed=i))[0]
        s.seed = i
        out.append(sample(logits.unsqueeze(0), [s])[0].token_id)
    return out


LOGITS = torch.tensor([3.0, 2.9, 2.8, 1.0, 0.5, -1.0, -2.0, -5.0])


def test_greedy_is_argmax():
    assert sample(LOGITS.unsqueeze(0), seqs(SamplingParams(temperature=0)))[0].token_id == 0


def test_top_k_keeps_only_k_most_likely():
    assert set(draw_many(LOGITS, dict(temperature=1.0, top_k=2))) == {0, 1}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = LOGITS.softmax(-1)
    # p just above the first two tokens' mass: exactly three tokens survive
    p = float(probs[:2].sum()) + 1e-4
    assert set(draw_many(LOGITS, dict(temperature=1.0, top_p=p))) == {0, 1, 2}


def test_min_p_drops_tokens_below_fraction_of_top():
    probs = LOGITS.softmax(-1)
    ratio = float(probs[3] / probs[0])
    kept = set(draw_many(LOGITS, dict(temperature=1.0, min_p=ratio * 1.01)))
    assert kept == {0, 1, 2}


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    draws = draw_many(logits, dict(temperature=1.0), n=3000)
    freq = [draws.count(i) / len(draws) for i in range(3)]
    assert all(abs(f - p) < 0.04 for f, p in zip(freq, [0.5, 0.3, 0.2]))


def test_repetition_penalty_demotes_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    s = seqs(SamplingParams(temperature=0, repetition_penalty=1.2), prompt=(0,))
    assert sample(logits, s)[0].token_id == 1


def test_frequency_penalty_counts_output_occurrences():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    s = seqs(SamplingParams(temperature=0, frequency_penalty=0.3), prompt=(5,))[0]
    s.output_token_ids = [0, 0]
    assert sample(logits, [s])[0].token_id == 1  # 2.0 - 2 * 0.3 = 1.4 < 1.5


def test_seeded_draw_depends_on_seed_and_index_only():
    logits = torch.randn(2, 50)
    a = seqs(SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=0.7, seed=1))
    for s in a:
        s.seed = s.params.seed
    first = [r.token_id for r in sample(logits, a)]
    alone = sample(logits[:1], a[:1])[0].token_id
    assert alone == first[0]
    assert token_seed(7, 0) != token_seed(7, 1) != token_seed(8, 0)


def test_logprobs_of_the_chosen_token_and_top_n():
    s = seqs(SamplingParams(temperature=0, logprobs=3))
    r = sample(LOGITS.unsqueeze(0), s)[0]
    ref = LOGITS.log_softmax(-1)
    assert math.isclose(r.logprob, float(ref[0]), rel_tol=1e-6)
    assert [t for t, _ in r.top_logprobs] == [0, 1, 2]


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("max_tokens", 0), ("top_k", -2), ("min_p", 2.0), ("repetition_penalty", 0.0),
    ("presence_penalty", 3.0), ("frequency_penalty", float("inf")), ("seed", -1), ("logprobs", 50),
    ("stop", [""]), ("stop_token_ids", [10_000]), ("max_tokens", 2.5),
])
def test_bad_sampling_values_raise_naming_the_field(field, value):
    with pytest.raises(SamplingError) as info:
        SamplingParams(**{field: value}).validate(vocab_size=1000)
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")


@pytest.mark.parametrize("stop", [["a"] * 17, ["x" * 257], ["ok", ""]])
def test_stop_strings_are_bounded_in_number_and_length(stop):
    with pytest.raises(SamplingError) as info:
        SamplingParams(stop=stop).validate()
    assert info.value.field == "stop"

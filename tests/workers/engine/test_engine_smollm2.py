"""The engine end to end on SmolLM2 (real tokenizer): stop strings, stop ids, EOS, streamed text."""
import pytest

from workers.engine.core import EngineConfig
from workers.engine.sampling_params import SamplingParams
from workers.launcher import start_worker_group
from workers.worker import WorkerSpec


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    with start_worker_group(WorkerSpec(str(smollm2_dir), tp_size=1, kv_cache_memory=64 << 20), EngineConfig()) as g:
        yield g


@pytest.fixture(scope="module")
def tok(smollm2_reference):
    return smollm2_reference[1]


def test_stop_string_ends_with_reason_and_no_stop_text(smol, tok):
    prompt = tok("Count: 1, 2, 3, 4,").input_ids
    free = smol.engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    assert " 7," in free.text  # the unconstrained continuation passes the stop string
    out = smol.engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, stop=[" 7,"]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == " 7,"
    assert " 7" not in out.text and free.text.startswith(out.text)


def test_stop_token_id_ends_generation(smol, tok):
    prompt = tok("Count: 1, 2, 3, 4,").input_ids
    free = smol.engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    stop_id = free.token_ids[3]
    out = smol.engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == free.token_ids[:free.token_ids.index(stop_id) + 1]


def test_chat_answer_ends_at_eos_and_streams_in_pieces(smol, tok):
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=True, return_dict=False)
    stream = smol.engine.add_request(list(prompt), SamplingParams(max_tokens=40, temperature=0))
    deltas = list(stream)
    text = "".join(d.new_text for d in deltas)
    assert "Paris" in text
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason in tok.convert_tokens_to_ids(["<|im_end|>"])
    assert len(deltas) > 3  # one delta per step, not one blob
    assert "<|im_end|>" not in text


def test_max_tokens_ends_with_length(smol, tok):
    out = smol.engine.generate([tok("Once upon a time").input_ids], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


@pytest.mark.parametrize("params", [
    dict(temperature=0, stop=[" 8,"]),
    dict(temperature=0.8, seed=7, top_p=0.9, frequency_penalty=0.5, presence_penalty=0.3),
], ids=["greedy-stop", "seeded-penalties"])
def test_resumed_request_continues_with_the_same_tokens_and_text(smol, tok, params):
    """A request resumed from its first k streamed tokens (as after a dead replica) streams exactly
    the rest of an uninterrupted run: same tokens, text with nothing repeated or missing, same end."""
    prompt = tok("Count: 1, 2, 3, 4,").input_ids
    sp = SamplingParams(max_tokens=14, **params)
    whole = smol.engine.generate([prompt], sp)[0]
    assert len(whole.token_ids) >= 6
    assert whole.finish_reason == ("stop" if "stop" in params else "length")
    for k in (1, 5):
        head = smol.engine.add_request(prompt, sp)
        received = []
        for out in head:  # the client's view of the first k tokens before the "failure"
            received.append(out)
            if sum(len(o.new_token_ids) for o in received) >= k:
                break
        smol.engine.abort(head.request_id)
        ids = [t for o in received for t in o.new_token_ids]
        rest = smol.engine.add_request(prompt, sp, output_prefix=ids).result()
        assert ids + rest.token_ids == whole.token_ids
        assert "".join(o.new_text for o in received) + rest.text == whole.text
        assert (rest.finish_reason, rest.stop_reason) == (whole.finish_reason, whole.stop_reason)
        assert rest.prompt_tokens == len(prompt)


def test_resume_with_nothing_left_is_refused_naming_the_field(smol, tok):
    prompt = tok("Hello").input_ids
    with pytest.raises(Exception, match="output_prefix"):
        smol.engine.add_request(prompt, SamplingParams(max_tokens=2), output_prefix=[5, 6]).result()

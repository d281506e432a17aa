"""Streaming text: never a split UTF-8 character, never a leaked (partial) stop string."""
import pytest

from workers.engine.detokenizer import Detokenizer


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


def stream(tok, prompt, text, stops=(), final_check=True):
    d = Detokenizer(tok)
    prompt_ids = tok.encode(prompt).ids
    out_ids = tok.encode(text).ids
    st = d.start(prompt_ids, list(stops))
    deltas, hit = [], None
    ids = list(prompt_ids)
    for i, t in enumerate(out_ids):
        ids.append(t)
        hit = d.add_token(st, ids)
        deltas.append(d.take_delta(st, final=hit is not None or i == len(out_ids) - 1))
        if hit:
            break
    return deltas, hit


def test_multibyte_characters_are_never_split(tok):
    text = " Voilà: 東京タワー and 🤖🎨 done"
    deltas, _ = stream(tok, "Say:", text)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert len([d for d in deltas if d]) > 3  # it really streamed


def test_stop_string_ends_text_and_never_leaks(tok):
    deltas, hit = stream(tok, "Q:", " one two three END four", stops=["END"])
    assert hit == "END"
    joined = "".join(deltas)
    assert joined == " one two three "


def test_partial_stop_prefix_is_held_then_released(tok):
    deltas, hit = stream(tok, "Q:", " a ##b ##c", stops=["###"])
    assert hit is None and "".join(deltas) == " a ##b ##c"


def test_special_tokens_are_kept_only_for_a_request_that_asks(tok):
    """skip_special_tokens is per request (vLLM's field; a tool-call format whose start tag is a
    special token needs it off): the same ids stream with or without <|im_end|>."""
    d = Detokenizer(tok)
    prompt = tok.encode("Hi").ids
    ids = tok.encode(" ok").ids + [tok.token_to_id("<|im_end|>")]
    texts = []
    for skip in (True, False):
        st = d.start(prompt, [], skip_special_tokens=skip)
        for n in range(1, len(ids) + 1):
            d.add_token(st, prompt + ids[:n])
        texts.append(d.take_delta(st, final=True))
    assert texts == [" ok", " ok<|im_end|>"]

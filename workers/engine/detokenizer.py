"""Incremental detokenisation and stop strings.

Text deltas are the difference between decoding a short window of tokens with and without the
newest ones, the window starting a few tokens back so leading spaces and merges come out right.
A delta ending in U+FFFD is an incomplete UTF-8 character: it is held until the next token
completes it. Text that could be the start of a stop string is held back too, so a stop string
never leaks, even partly, into the stream.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def backend(tokenizer):
    """The fast `tokenizers.Tokenizer` under a transformers tokenizer (much cheaper per call)."""
    return getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None) or tokenizer


@dataclass(slots=True)
class DetokState:
    prefix_offset: int
    read_offset: int
    text: str = ""  # all output text decoded so far (truncated at a stop string)
    emitted: int = 0  # characters of `text` already streamed
    stops: list[str] = field(default_factory=list)
    skip_special: bool = True  # the request's skip_special_tokens


class Detokenizer:
    def __init__(self, tokenizer):
        self.tok = backend(tokenizer)

    def _decode(self, st: DetokState, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=st.skip_special)

    def start(self, prompt_ids: list[int], stops: list[str], skip_special_tokens: bool = True) -> DetokState:
        n = len(prompt_ids)
        return DetokState(prefix_offset=max(0, n - 6), read_offset=n, stops=stops, skip_special=skip_special_tokens)

    def add_token(self, st: DetokState, all_ids: list[int]) -> str | None:
        """Append the newest token's text. Returns the stop string if one now appears in the text."""
        prefix = self._decode(st, all_ids[st.prefix_offset:st.read_offset])
        full = self._decode(st, all_ids[st.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            st.text += full[len(prefix):]
            st.prefix_offset, st.read_offset = st.read_offset, len(all_ids)
        if st.stops:
            longest = max(map(len, st.stops))
            window_start = max(0, len(st.text) - len(full) - longest)
            hits = [(st.text.find(s, window_start), s) for s in st.stops]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                st.text = st.text[:i]
                return s
        return None

    def replay(self, st: DetokState, all_ids: list[int], prompt_len: int) -> None:
        """Bring a fresh state up to date with outputs the client already has (a resumed request):
        the same add/take calls the first run made, so the text held back (a possible stop prefix)
        is the same and nothing is streamed twice."""
        for n in range(prompt_len + 1, len(all_ids) + 1):
            self.add_token(st, all_ids[:n])
            self.take_delta(st, final=False)

    @staticmethod
    def take_delta(st: DetokState, final: bool) -> str:
        """The text that may be streamed now: all of it when final, else minus a possible stop prefix."""
        end = len(st.text)
        if not final and st.stops:
            for k in range(min(max(map(len, st.stops)) - 1, end), 0, -1):
                tail = st.text[end - k:]
                if any(s.startswith(tail) for s in st.stops):
                    end -= k
                    break
        delta = st.text[st.emitted:end]
        st.emitted = max(st.emitted, end)
        return delta

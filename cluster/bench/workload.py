"""What to send: prompt and output lengths (or prompts from a JSONL file), seeded.

Kinds: fixed lengths; random lengths in ranges; a long-tailed chat-like mix (lognormal lengths);
shared-prefix requests (one common system prefix + distinct suffixes, to exercise prefix caching);
multi-tenant (T tenants, each a long system prompt, then short questions, tenants interleaved);
conversation (multi-turn sessions: each turn's prompt is the previous prompt + its answer + a new
question, sent as token ids so the chain of KV blocks survives the answer's boundary); repetitive
(tasks whose answer repeats its prompt, built from text that ships with the repo: rewrite a
passage, edit code, answer from a document by quoting it: what speculative decoding's prompt
lookup is for); a JSONL file of {"prompt": ..., "max_tokens": ...}. Output lengths are enforced
with ignore_eos.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Common words that SmolLM2's tokenizer (and most BPE vocabularies) keep as one token each with a
# leading space, so text prompts for the KServe protocol have about the asked length.
WORDS = ("the of and to in is for on that with as by at from this be are it an or was have not but can all "
         "will one has more new time data work use world life state year day long water good system "
         "people number part place case point group problem fact hand").split()


@dataclass(slots=True)
class BenchRequest:
    prompt_ids: list[int] | None  # for the tpserve protocol (exact length)
    prompt_text: str  # for the KServe protocol
    output_len: int
    # conversation: the questions of the later turns (each turn = previous prompt + answer + question)
    follow_ups: list[list[int]] | None = None
    tenant: int | None = None  # multi-tenant: whose system prompt this is
    # Keeps this request's KV blocks apart from any other salt's (vLLM's `cache_salt`): the same
    # prompts sent twice, by two clients compared on them, then both prefill in full.
    cache_salt: str | None = None


@dataclass(slots=True)
class WorkloadSpec:
    kind: str = "random"  # fixed | random | longtail | shared-prefix | file
    input_len: int = 128
    output_len: int = 64
    input_range: tuple[int, int] = (32, 256)
    output_range: tuple[int, int] = (16, 128)
    prefix_len: int | None = None  # shared-prefix: 256; multi-tenant: 1,000
    file: str | None = None
    tenants: int = 8
    turns: int = 4


def _text(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def _ids(rng, n: int, vocab: int) -> list[int]:
    return rng.integers(100, vocab - 100, size=n).tolist()


def make_workload(spec: WorkloadSpec, n: int, vocab: int, seed: int = 0) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    if spec.kind == "file":
        if not spec.file or not Path(spec.file).is_file():
            raise ValueError(f"--workload-file: no such file {spec.file!r}")
        rows = [json.loads(line) for line in Path(spec.file).read_text().splitlines() if line.strip()]
        if not rows:
            raise ValueError(f"--workload-file: {spec.file} holds no prompts")
        out = []
        for i in range(n):
            r = rows[i % len(rows)]
            if not isinstance(r, dict) or not r.get("prompt"):
                raise ValueError(f"--workload-file: line {i % len(rows) + 1} has no prompt")
            out.append(BenchRequest(None, r["prompt"], int(r.get("max_tokens", spec.output_len))))
        return out
    if spec.kind == "fixed":
        ins, outs = np.full(n, spec.input_len), np.full(n, spec.output_len)
    elif spec.kind == "random":
        ins = rng.integers(spec.input_range[0], spec.input_range[1] + 1, size=n)
        outs = rng.integers(spec.output_range[0], spec.output_range[1] + 1, size=n)
    elif spec.kind == "longtail":  # chat-like: most requests short, a few long (lognormal, clipped)
        ins = np.clip(rng.lognormal(np.log(spec.input_len), 0.9, size=n), 4, 8 * spec.input_len).astype(int)
        outs = np.clip(rng.lognormal(np.log(spec.output_len), 0.7, size=n), 2, 8 * spec.output_len).astype(int)
    elif spec.kind == "shared-prefix":
        plen = spec.prefix_len or 256
        prefix_ids, prefix_text = _ids(rng, plen, vocab), _text(rng, plen)
        return [BenchRequest(prefix_ids + _ids(rng, spec.input_len, vocab),
                             prefix_text + " " + _text(rng, spec.input_len), spec.output_len) for _ in range(n)]
    elif spec.kind == "multi-tenant":
        return _multi_tenant(spec, n, vocab, rng)
    elif spec.kind == "conversation":
        return _conversation(spec, n, vocab, rng)
    elif spec.kind == "repetitive":
        return repetitive(n, rng, spec.output_range)
    else:
        raise ValueError(f"--workload {spec.kind!r}: use fixed, random, longtail, shared-prefix, multi-tenant, "
                         f"conversation repetitive or file")
    return [BenchRequest(_ids(rng, int(i), vocab), _text(rng, int(i)), int(o)) for i, o in zip(ins, outs)]


def _lengths(rng, lo_hi: tuple[int, int], n: int) -> list[int]:
    return rng.integers(lo_hi[0], lo_hi[1] + 1, size=n).tolist()


def _multi_tenant(spec: WorkloadSpec, n: int, vocab: int, rng) -> list[BenchRequest]:
    """Each request: one tenant's system prompt (drawn uniformly, so tenants interleave) + a question."""
    if spec.tenants < 1:
        raise ValueError(f"--tenants must be >= 1, got {spec.tenants}")
    plen = spec.prefix_len or 1000
    systems = [(_ids(rng, plen, vocab), _text(rng, plen)) for _ in range(spec.tenants)]
    tenants = rng.integers(0, spec.tenants, size=n).tolist()
    qlens, outs = _lengths(rng, spec.input_range, n), _lengths(rng, spec.output_range, n)
    return [BenchRequest(systems[t][0] + _ids(rng, q, vocab), systems[t][1] + " " + _text(rng, q), o, tenant=t)
            for t, q, o in zip(tenants, qlens, outs)]


def _conversation(spec: WorkloadSpec, n: int, vocab: int, rng) -> list[BenchRequest]:
    """ceil(n / turns) sessions of `turns` turns; one BenchRequest per session (its first turn)."""
    if spec.turns < 1:
        raise ValueError(f"--turns must be >= 1, got {spec.turns}")
    sessions = -(-n // spec.turns)
    out = []
    for _ in range(sessions):
        qs = [_ids(rng, q, vocab) for q in _lengths(rng, spec.input_range, spec.turns)]
        out.append(BenchRequest(qs[0], "", int(_lengths(rng, spec.output_range, 1)[0]), follow_ups=qs[1:]))
    return out


DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data"
# Source files of this repository, as the code to edit (any text with structure would do).
CODE = Path(__file__).resolve().parents[2] / "workers" / "engine"


def _paragraphs() -> list[str]:
    text = (DATA / "keeping_time.txt").read_text()
    return [p.replace("\n", " ") for p in text.split("\n\n") if len(p) > 300]


def _functions() -> list[str]:
    """Functions of 8-40 lines from the engine's own source, whole."""
    out = []
    for f in sorted(CODE.glob("*.py")):
        lines = f.read_text().splitlines()
        starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("def ")]
        for a, b in zip(starts, starts[1:] + [len(lines)]):
            body = "\n".join(lines[a:b]).rstrip()
            if 8 <= body.count("\n") <= 40:
                out.append(body)
    return out


def repetitive(n: int, rng, output_range: tuple[int, int]) -> list[BenchRequest]:
    """Tasks whose answer repeats much of the prompt, in turn: rewrite a passage, edit code,
    answer from a document by quoting it. Text prompts (the server tokenizes them)."""
    paras, funcs = _paragraphs(), _functions()
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            p = paras[int(rng.integers(len(paras)))]
            prompt = f"Passage:\n{p}\n\nThe same passage, rewritten with British spelling:\n"
        elif kind == 1:
            f = funcs[int(rng.integers(len(funcs)))]
            prompt = f"```python\n{f}\n```\n\nThe same function with the variable names made longer:\n```python\n"
        else:
            a = int(rng.integers(len(paras) - 1))
            doc = paras[a] + "\n\n" + paras[a + 1]
            prompt = (f"Document:\n{doc}\n\nQuestion: What does the document say, in its own words? Answer by "
                      f"quoting its sentences.\nAnswer: \"")
        out.append(BenchRequest(None, prompt, int(rng.integers(output_range[0], output_range[1] + 1))))
    return out

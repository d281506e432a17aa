"""What to send: prompt and output lengths (or prompts from a JSONL file), seeded.

Kinds: fixed lengths; random lengths in ranges; a long-tailed chat-like mix (lognormal lengths);
shared-prefix requests (one common system prefix + distinct suffixes, to exercise prefix caching);
a JSONL file of {"prompt": ..., "max_tokens": ...}. Output lengths are enforced with ignore_eos.
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


@dataclass(slots=True)
class WorkloadSpec:
    kind: str = "random"  # fixed | random | longtail | shared-prefix | file
    input_len: int = 128
    output_len: int = 64
    input_range: tuple[int, int] = (32, 256)
    output_range: tuple[int, int] = (16, 128)
    prefix_len: int = 256
    file: str | None = None


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
        prefix_ids, prefix_text = _ids(rng, spec.prefix_len, vocab), _text(rng, spec.prefix_len)
        return [BenchRequest(prefix_ids + _ids(rng, spec.input_len, vocab),
                             prefix_text + " " + _text(rng, spec.input_len), spec.output_len) for _ in range(n)]
    else:
        raise ValueError(f"--workload {spec.kind!r}: use fixed, random, longtail, shared-prefix or file")
    return [BenchRequest(_ids(rng, int(i), vocab), _text(rng, int(i)), int(o)) for i, o in zip(ins, outs)]

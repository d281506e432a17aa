"""llama.cpp as tpserve's CPU peer, driven through llama-cpp-python's low-level batch API (its
high-level `Llama` for lookup decoding, which only that layer has).

Runs in the benchmark's own venv (`make bench-peers` builds `.venv-peers`), never in tpserve's:
    .venv-peers/bin/python benchmarks/llama_cpp_driver.py MODEL.gguf < job.json > result.json

The job (JSON on stdin) names one measurement; token ids come from the caller (SmolLM2's
tokenizer, the same vocabulary the GGUF carries), so every system sees the same tokens:
- {"op": "decode", "prompt": [...], "new_tokens": N, "repeats": R}
  batch-1 greedy decode; ms/token = (t(N) - t(1)) / (N - 1), the median of R.
- {"op": "batch", "requests": [[prompt, out_len], ...]}
  every request at once, one sequence id each (kv_unified off: each sequence its own KV stream),
  prompts in n_batch chunks, then one decode call per step over every live sequence; greedy,
  EOS ignored, exactly out_len tokens each. Returns output tokens and seconds.
- {"op": "perplexity", "tokens": [...], "window": W, "stride": S}
  logits at every position (each batch entry asks for its logits: llama.cpp's logits_all),
  scored exactly as benchmarks.quality scores tpserve.
- {"op": "lookup", "prompts": [[...], ...], "new_tokens": N, "num_pred_tokens": K, "repeats": R}
  batch 1, greedy, N tokens per prompt (EOS not checked: `generate` never stops on its own), the
  prompts one after another, through llama-cpp-python's own high-level `Llama.generate` with its
  prompt lookup decoding (`LlamaPromptLookupDecoding`, K proposed tokens) or, with K = 0, without
  it; output tokens / seconds (prefill included, as benchmarks.speculative times tpserve) per repeat.

Only this file imports llama_cpp; it imports nothing from tpserve.
"""
from __future__ import annotations

import json
import math
import sys
import time

import llama_cpp
import numpy as np


class Llama:
    def __init__(self, path: str, n_seq: int, n_ctx_per_seq: int, threads: int, n_batch: int = 512):
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), mparams)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_seq * n_ctx_per_seq
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.kv_unified = False
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise SystemExit("llama.cpp could not create a context")
        self.n_batch, self.n_seq = n_batch, n_seq
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, n_seq)

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """entries: (token, position, seq id, wants logits); returns the batch rows with logits.
        Larger lists go in n_batch chunks; rows are numbered within the last chunk only, so a
        caller that wants logits from several chunks reads them per chunk (see `run`)."""
        b = self.batch
        rows = []
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
            if logits:
                rows.append(i)
        b.n_tokens = len(entries)
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise SystemExit(f"llama_decode returned {rc}")
        return rows

    def run(self, entries, on_logits) -> None:
        """Decode any number of entries in n_batch chunks; on_logits(entry index, logits row)."""
        for start in range(0, len(entries), self.n_batch):
            chunk = entries[start:start + self.n_batch]
            for row in self.decode(chunk):
                on_logits(start + row, self.logits(row))

    def logits(self, row: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, row)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))


def greedy(llm: Llama, requests: list[tuple[list[int], int]]) -> int:
    """Every request at once; returns output tokens produced."""
    llm.clear()
    nxt: dict[int, int] = {}
    entries = [(t, p, s, p == len(prompt) - 1) for s, (prompt, _) in enumerate(requests) for p, t in enumerate(prompt)]
    llm.run(entries, lambda i, lg: nxt.__setitem__(entries[i][2], int(np.argmax(lg))))
    made = {s: 1 for s in nxt}
    pos = {s: len(requests[s][0]) for s in nxt}
    produced = len(nxt)
    while True:
        live = [s for s in nxt if made[s] < requests[s][1]]
        if not live:
            return produced
        step = [(nxt[s], pos[s], s, True) for s in live]
        rows = llm.decode(step)
        for row, s in zip(rows, live):
            nxt[s] = int(np.argmax(llm.logits(row)))
            made[s] += 1
            pos[s] += 1
            produced += 1


def perplexity(llm: Llama, tokens: list[int], window: int, stride: int) -> float:
    nll, n = 0.0, 0
    for start in range(0, len(tokens) - 1, stride):
        ids = tokens[start:start + window]
        if len(ids) < 2:
            break
        llm.clear()
        first = 0 if start == 0 else window - stride - 1
        lp: dict[int, float] = {}

        def score(i: int, lg: np.ndarray) -> None:
            if first <= i < len(ids) - 1:
                x = lg.astype(np.float64)
                m = x.max()
                lp[i] = x[ids[i + 1]] - m - math.log(np.exp(x - m).sum())

        llm.run([(t, p, 0, True) for p, t in enumerate(ids)], score)
        nll -= sum(lp.values())
        n += len(lp)
        if start + window >= len(tokens):
            break
    return math.exp(nll / n)


def lookup(path: str, prompts: list[list[int]], n: int, k: int, repeats: int, threads: int) -> list[float]:
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          draft_model=LlamaPromptLookupDecoding(num_pred_tokens=k) if k else None, verbose=False)

    def run(prompt: list[int], tokens: int) -> int:
        got = 0
        for _ in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
            got += 1
            if got == tokens:
                break
        return got

    run(prompts[0], 4)  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        tokens = sum(run(p, n) for p in prompts)
        out.append(tokens / (time.perf_counter() - t))
    return out


def main() -> None:
    path = sys.argv[1]
    job = json.load(sys.stdin)
    threads = job.get("threads", 2)
    if job["op"] == "decode":
        llm = Llama(path, 1, 1024, threads)
        prompt, n = job["prompt"], job["new_tokens"]
        greedy(llm, [(prompt, 4)])  # warm-up
        samples = []
        for _ in range(job.get("repeats", 3)):
            t = time.perf_counter(); greedy(llm, [(prompt, 1)]); t1 = time.perf_counter() - t
            t = time.perf_counter(); greedy(llm, [(prompt, n)]); tn = time.perf_counter() - t
            samples.append((tn - t1) / (n - 1) * 1e3)
        out = {"ms_per_token": sorted(samples)[len(samples) // 2], "samples": samples}
    elif job["op"] == "batch":
        reqs = [(p, o) for p, o in job["requests"]]
        per_seq = max(len(p) + o for p, o in reqs)
        llm = Llama(path, len(reqs), -(-per_seq // 256) * 256, threads)
        greedy(llm, [(reqs[0][0], 2)])  # warm-up
        t = time.perf_counter()
        tokens = greedy(llm, reqs)
        out = {"output_tokens": tokens, "seconds": time.perf_counter() - t}
    elif job["op"] == "perplexity":
        llm = Llama(path, 1, job["window"], threads)
        out = {"perplexity": perplexity(llm, job["tokens"], job["window"], job["stride"])}
    elif job["op"] == "lookup":
        out = {"tok_s": lookup(path, job["prompts"], job["new_tokens"], job["num_pred_tokens"], job.get("repeats", 3),
                               threads)}
    else:
        raise SystemExit(f"unknown op {job['op']!r}")
    out["llama_cpp_python"] = llama_cpp.__version__
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

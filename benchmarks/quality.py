"""What quantization costs in quality: perplexity on a fixed text and greedy agreement with the
unquantized model, in one run.

    python -m benchmarks.quality [--model smollm2-135m] [--quantizations none,int8,int4,int4-decode]
                                 [--window 512] [--stride 256] [--prompts 32] [--new-tokens 32]

- Perplexity: `benchmarks/data/keeping_time.txt` (4,166 SmolLM2 tokens, written for this
  repository and public domain), scored in windows of --window tokens that advance by --stride:
  every token is scored once, with at least window - stride tokens of context (the first window's
  tokens with what precedes them).
- Greedy agreement: --prompts spans of 24 tokens taken evenly from the same text, --new-tokens
  greedy tokens each; the share of positions whose token equals the unquantized model's, and the
  mean length of the prefix that matches.

- `int4-decode`: int4, with every row (the prefill's too) through the few-row kernel
  `tpserve::int4_gemv`, 4 rows a call, where batch-1 decode takes it (it rounds activations to int8
  per group): its perplexity is decode's arithmetic; plain `int4` scores PyTorch's kernels' (a
  prefill's many rows). Greedy tokens are decode's in both.

The built-in SmolLM2 is a Q4_1 GGUF (its embedding Q8_0): its "none" is dequantized 4-bit, so the
int8 and int4 rows here measure requantization of an already 4-bit model.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path

from workers import set_openmp_env  # noqa: E402
set_openmp_env()

import torch  # noqa: E402

from workers.engine.sampling_params import SamplingParams  # noqa: E402
from workers.launcher import start_worker_group, threads_per_rank  # noqa: E402
from workers.model_source import resolve_model  # noqa: E402
from workers.worker import WorkerSpec  # noqa: E402

TEXT = Path(__file__).parent / "data" / "keeping_time.txt"


def perplexity(group, tokens: list[int], window: int, stride: int) -> float:
    nll, n = 0.0, 0
    for start in range(0, len(tokens) - 1, stride):
        ids = tokens[start:start + window]
        if len(ids) < 2:
            break
        logits = group.call("prefill_logits", [ids]).float()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        targets = torch.tensor(ids[1:])
        first = 0 if start == 0 else window - stride - 1  # score only tokens no earlier window scored
        picked = logp[first:].gather(1, targets[first:, None]).squeeze(1)
        nll -= float(picked.sum())
        n += picked.numel()
        if start + window >= len(tokens):
            break
    return math.exp(nll / n)


@contextlib.contextmanager
def int4_rows_through_the_decode_kernel():
    """Int4Linear layers of this process send every row to tpserve::int4_gemv, 4 rows a call."""
    from workers.layers.linear_method import Int4Linear

    def apply(self, layer, x):
        if getattr(layer, "weight_gemv", None) is None:
            raise SystemExit("int4-decode: tpserve::int4_gemv does not serve on this machine (no VNNI or no kernels)")
        y = torch.cat([self.gemv(layer, part) for part in x.split(4)]) if x.shape[0] else self.gemv(layer, x[:1])[:0]
        return y if layer.bias is None else y + layer.bias

    saved = Int4Linear.apply
    Int4Linear.apply = apply
    try:
        yield
    finally:
        Int4Linear.apply = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quantizations", default="none,int8,int4")
    ap.add_argument("--group-size", type=int, default=32, help="int4 group size")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    folder = resolve_model(args.model)
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(str(folder))(TEXT.read_text()).input_ids
    step = (len(tokens) - 24) // args.prompts
    prompts = [tokens[i * step:i * step + 24] for i in range(args.prompts)]
    print(f"{args.model}: {len(tokens)} tokens of {TEXT.name}, windows of {args.window} by {args.stride}; "
          f"{args.prompts} prompts x {args.new_tokens} greedy tokens; tp 1, {threads_per_rank(1)} threads")
    rows, reference = [], None
    for name in args.quantizations.split(","):
        q = name.removesuffix("-decode")
        spec = WorkerSpec(str(folder), tp_size=1, quantization=q, quant_group_size=args.group_size,
                          kv_cache_memory=256 << 20)
        t = time.perf_counter()
        patched = int4_rows_through_the_decode_kernel() if name == "int4-decode" else contextlib.nullcontext()
        with patched, start_worker_group(spec) as group:
            weights = group.reports[0]["param_bytes"]
            ppl = perplexity(group, tokens, args.window, args.stride)
            outs = [c.token_ids for c in group.engine.generate(
                prompts, SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True))]
        if reference is None:
            reference = (ppl, outs)
        same = sum(a == b for o, r in zip(outs, reference[1]) for a, b in zip(o, r))
        prefix = sum(next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), len(r))
                     for o, r in zip(outs, reference[1])) / len(outs)
        tag = spec.quant.tag + (" decode kernel" if name.endswith("-decode") else "")
        rows.append((tag, weights, ppl, ppl / reference[0] - 1, same / (len(outs) * args.new_tokens), prefix))
        print(f"  {tag:<9} perplexity {ppl:8.3f}  ({time.perf_counter() - t:.0f} s)", flush=True)
    print("\n| quantization | weights MiB | perplexity | vs none | greedy tokens equal | matching prefix (mean) |")
    print("|---|---:|---:|---:|---:|---:|")
    for tag, weights, ppl, rel, agree, prefix in rows:
        print(f"| {tag} | {weights / 2**20:.0f} | {ppl:.3f} | {rel:+.2%} | {agree:.1%} | {prefix:.1f} of {args.new_tokens} |")


if __name__ == "__main__":
    main()

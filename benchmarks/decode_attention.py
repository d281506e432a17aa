"""Decode attention in place (tpserve::paged_decode) against the gather path, in one run.

    python -m benchmarks.decode_attention [--model smollm2-135m] [--tp 1] [--dtype float32]
                                          [--mix decode] [--repeats 3] [--speculative K]

Two worker groups of the same model, one pinned to each path (TPSERVE_PAGED_DECODE=always | off,
set before their ranks start), run the same requests by turns, --repeats times: the 64 requests of
`benchmarks.throughput`'s mix (every request at once, output tok/s) and a batch-1 decode
(ms/token over 64 tokens). Prints each figure's median (min-max) and the in-place / gather ratio.
Greedy outputs of the two groups are compared too (they must agree token for token in float32).
With --speculative K, both groups verify ngram proposals of K tokens at every batch size (the cost
rule off), so their steps carry spans of up to K + 1 rows: the figures then compare the two paths
on verify steps, and the greedy outputs must still agree.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from workers import set_openmp_env

set_openmp_env()

from benchmarks.throughput import engine_run, make_requests  # noqa: E402
from workers.engine.core import EngineConfig  # noqa: E402
from workers.engine.sampling_params import SamplingParams  # noqa: E402
from workers.engine.speculative import SpeculativeConfig  # noqa: E402
from workers.launcher import start_worker_group  # noqa: E402
from workers.model_source import resolve_model  # noqa: E402
from workers.worker import WorkerSpec  # noqa: E402

PATHS = {"in place": "always", "gather": "off"}


def batch1_ms(group, prompt: list[int]) -> float:
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    many = SamplingParams(max_tokens=65, temperature=0.0, ignore_eos=True)
    t = time.perf_counter(); group.engine.generate([prompt], one); t1 = time.perf_counter() - t
    t = time.perf_counter(); group.engine.generate([prompt], many); t65 = time.perf_counter() - t
    return (t65 - t1) / 64 * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--mix", default="decode", choices=["decode", "long"])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--speculative", type=int, default=0, help="ngram proposals of this many tokens, forced on")
    args = ap.parse_args()
    folder = str(resolve_model(args.model))
    spec = WorkerSpec(folder, tp_size=args.tp, dtype=args.dtype, kv_cache_memory=3 << 30)
    ngram = SpeculativeConfig("ngram", args.speculative, adaptive=False) if args.speculative else None
    cfg = EngineConfig(max_num_seqs=args.num_requests, max_num_batched_tokens=1024, speculative=ngram)
    groups = {}
    before = os.environ.get("TPSERVE_PAGED_DECODE")
    for name, mode in PATHS.items():
        os.environ["TPSERVE_PAGED_DECODE"] = mode  # read by the ranks as they start
        groups[name] = start_worker_group(spec, cfg).__enter__()
    if before is None:
        os.environ.pop("TPSERVE_PAGED_DECODE", None)
    else:
        os.environ["TPSERVE_PAGED_DECODE"] = before
    try:
        vocab = groups["gather"].engine.call("info")["config"]["vocab_size"]
        reqs = make_requests(args.mix, args.num_requests, vocab)
        prompt = make_requests("decode", 1, vocab, seed=7)[0].prompt
        tok_s = {n: [] for n in groups}
        ms = {n: [] for n in groups}
        outputs = {}
        for g in groups.values():
            engine_run(g, make_requests("decode", 4, vocab, seed=99))  # warm-up
        drafts = {n: 0 for n in groups}
        for rep in range(args.repeats):
            for name, g in (groups.items() if rep % 2 == 0 else reversed(groups.items())):
                before = g.engine.call("stats").spec_drafts
                n, t = engine_run(g, reqs)
                drafts[name] += g.engine.call("stats").spec_drafts - before
                tok_s[name].append(n / t)
                ms[name].append(batch1_ms(g, prompt))
            print(f"  repeat {rep + 1}/{args.repeats}: " + ", ".join(
                f"{n} {tok_s[n][-1]:.1f} tok/s, {ms[n][-1]:.1f} ms/token" for n in groups), flush=True)
        greedy = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
        for name, g in groups.items():
            outputs[name] = [c.token_ids for c in g.engine.generate([r.prompt for r in reqs[:16]], greedy)]
    finally:
        for g in groups.values():
            g.__exit__(None, None, None)

    def fmt(xs):
        return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"

    print(f"\n`python -m benchmarks.decode_attention --tp {args.tp} --dtype {args.dtype} --mix {args.mix} "
          f"--repeats {args.repeats}" + f" --speculative {args.speculative}" * bool(args.speculative) +
          f"`, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores; median (min-max)\n")
    print(f"| decode attention | {args.num_requests} requests output tok/s | batch-1 ms/token |")
    print("|---|---:|---:|")
    for name in groups:
        print(f"| {name} | {fmt(tok_s[name])} | {fmt(ms[name])} |")
    r_tok = statistics.median(tok_s["in place"]) / statistics.median(tok_s["gather"])
    r_ms = statistics.median(ms["in place"]) / statistics.median(ms["gather"])
    print(f"| in place / gather | {r_tok:.2f}x | {r_ms:.2f}x |")
    same = sum(a == b for a, b in zip(outputs["in place"], outputs["gather"]))
    print(f"\ngreedy outputs equal on {same}/{len(outputs['gather'])} requests (32 tokens each)")
    if args.speculative:
        print("proposals verified (spec_drafts) over the 64-request runs: " +
              ", ".join(f"{n} {drafts[n]}" for n in groups))


if __name__ == "__main__":
    main()

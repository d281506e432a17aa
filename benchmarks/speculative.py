"""Speculative decoding against decoding without it, on the same requests, in one run.

    python -m benchmarks.speculative [--model smollm2-135m] [--k 4] [--repeats 3] [--tps 1,2]
                                     [--draft smollm2-135m --draft-quantization int4] [--concurrency 1,2,4,8,16]

1. Equality: 64 prompts of the repetitive workload (cluster/bench/workload.py), greedy, 32 tokens,
   at each tp: without speculation, with ngram, with the draft model; texts equal / 64.
2. Sampling: the 1st and 10th token of one prompt over 256 requests, each run with its own
   seeds, with and without ngram: total variation between them beside two honest runs without.
3. Speed: output tokens/s, without against ngram (and the draft), at batch 1 on the repetitive
   workload and on random-token prompts, greedy (whose output loops) and sampled at temperature 1
   (nothing to look up), and at each --concurrency on the
   repetitive workload with speculation forced at every batch size (max_batch lifted, the cost
   rule off): where the ratio falls below 1 is the cross-over a fixed max_batch would take. Then
   the same at the top concurrency with the default rules (the cost rule deciding, no max_batch).
   --repeats runs each, median and min-max shown.
4. With --llama-cpp (`make bench-peers` builds its venv): llama.cpp on the same GGUF that tpserve
   converts (Q4_1), batch 1, the same repetitive prompts and token count, greedy, with
   llama-cpp-python's prompt lookup decoding and without, beside tpserve's batch-1 rows.
Every figure is measured in this run; the ratios are against this run's no-speculation engine.
"""
from __future__ import annotations

import argparse
import statistics
import time

from workers import set_openmp_env  # noqa: E402
set_openmp_env()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cluster.bench.workload import repetitive  # noqa: E402
from workers.engine.core import EngineConfig  # noqa: E402
from workers.engine.sampling_params import SamplingParams  # noqa: E402
from workers.engine.speculative import SpeculativeConfig  # noqa: E402
from workers.launcher import start_worker_group  # noqa: E402
from workers.model_source import resolve_model  # noqa: E402
from workers.worker import WorkerSpec  # noqa: E402

UNLIMITED = 1 << 16


def tokenized(tok, n: int, seed: int) -> list[list[int]]:
    return [tok(r.prompt_text).input_ids for r in repetitive(n, np.random.default_rng(seed), (1, 1))]


def random_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 100, (int(torch.randint(64, 256, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


# The engine's rules for when to speculate, as the speed rows run them: its defaults (the cost rule
# deciding at any batch); and forced at any batch (every proposal verified: where that stops paying
# is the cross-over).
MODES = {"default": {}, "forced": {"max_batch": UNLIMITED, "adaptive": False}}


def configs(args, mode: str = "default") -> dict[str, SpeculativeConfig | None]:
    extra = MODES[mode]
    out = {"none": None, "ngram": SpeculativeConfig("ngram", args.k, prompt_lookup_max=args.lookup_max,
                                                    prompt_lookup_min=args.lookup_min, **extra)}
    if args.draft:
        out["draft"] = SpeculativeConfig("draft_model", args.k, model=args.draft, quantization=args.draft_quantization,
                                         **extra)
    return out


def group(args, tp: int, spec: SpeculativeConfig | None):
    ws = WorkerSpec(str(resolve_model(args.model)), tp_size=tp, dtype=args.dtype, quantization=args.quantization)
    return start_worker_group(ws, EngineConfig(max_num_seqs=256, max_num_batched_tokens=1024, speculative=spec))


def timed(g, prompts, params, concurrency: int) -> tuple[float, int, dict, list[list[int]]]:
    """(seconds, output tokens, spec counters, outputs): `concurrency` requests at a time."""
    before = g.engine.call("stats")
    t = time.perf_counter()
    outs = []
    for i in range(0, len(prompts), concurrency):
        outs += [c.token_ids for c in g.engine.generate(prompts[i:i + concurrency], params)]
    seconds = time.perf_counter() - t
    after = g.engine.call("stats")
    return seconds, sum(map(len, outs)), {k: getattr(after, k) - getattr(before, k)
                                          for k in ("spec_drafts", "spec_draft_tokens", "spec_accepted_tokens")}, outs


def base_of(label: str) -> str:
    """The no-speculation row a speed row is compared with: the same workload, whatever the rule."""
    return "repetitive" if label.startswith("repetitive") else label


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantization", default="none", help="the target's weights: none, int8, int4")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--lookup-max", type=int, default=4)
    ap.add_argument("--lookup-min", type=int, default=2)
    ap.add_argument("--draft", default=None, help="draft model (e.g. smollm2-135m with --draft-quantization int4)")
    ap.add_argument("--draft-quantization", default="none")
    ap.add_argument("--tps", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", default="1,2,4,8,16")
    ap.add_argument("--output-len", type=int, default=128, help="tokens per request in the speed runs")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: equality,sampling,speed")
    ap.add_argument("--llama-cpp", action="store_true", help="also llama.cpp's lookup decoding (needs .venv-peers)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve_model(args.model)))
    t0 = time.perf_counter()
    print(f"`python -m benchmarks.speculative` {time.strftime('%Y-%m-%d %H:%M')}, model {args.model} "
          f"{args.dtype} {args.quantization}, "
          f"K={args.k}, lookup {args.lookup_min}-{args.lookup_max}, draft {args.draft or '-'} "
          f"({args.draft_quantization}), torch threads {torch.get_num_threads()}\n", flush=True)

    if "equality" not in skip:
        prompts = tokenized(tok, 64, seed=1)
        greedy = SamplingParams(max_tokens=32, temperature=0.0)
        print("| tp | method | greedy texts equal to no speculation | acceptance |\n|---:|---|---:|---:|")
        for tp in (int(t) for t in args.tps.split(",")):
            base = None
            for name, spec in configs(args, "forced").items():
                with group(args, tp, spec) as g:
                    _, _, sp, outs = timed(g, prompts, greedy, 64)
                if base is None:
                    base = outs
                    continue
                same = sum(a == b for a, b in zip(outs, base))
                rate = sp["spec_accepted_tokens"] / max(sp["spec_draft_tokens"], 1)
                print(f"| {tp} | {name} | {same}/64 | {rate:.0%} |", flush=True)
        print()

    if "sampling" not in skip:
        prompt = tokenized(tok, 1, seed=2)[0]
        n = 256

        def freqs(spec, first_seed):
            # Each run its own seeds, so the runs are independent draws.
            params = [SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True, seed=first_seed + i)
                      for i in range(n)]
            with group(args, 1, spec) as g:
                outs = [c.token_ids for c in g.engine.generate([prompt] * n, params)]
            return [np.bincount([o[i] for o in outs], minlength=len(tok)) / n for i in (0, 9)]

        def tv(a, b):
            return [0.5 * float(np.abs(x - y).sum()) for x, y in zip(a, b)]

        a, b = freqs(None, 0), freqs(None, 10_000)
        s = freqs(configs(args, "forced")["ngram"], 20_000)
        honest, spec_tv = tv(a, b), tv(s, a)
        print(f"sampling, {n} requests (independent seeds), temperature 1: total variation 1st token {spec_tv[0]:.3f} "
              f"(two runs without: {honest[0]:.3f}), 10th token {spec_tv[1]:.3f} (without: {honest[1]:.3f})\n",
              flush=True)

    if "speed" not in skip:
        conc = [int(c) for c in args.concurrency.split(",")]
        rep = tokenized(tok, max(*conc, 3), seed=3)  # three at least: the batch-1 rows take three
        rnd = random_prompts(8, len(tok), seed=4)
        params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
        # Sampled at temperature 1 the output of random-token prompts does not loop (greedy, it
        # does: its 100% acceptance above), so the lookup has nothing to find: speculation's floor.
        sampled = SamplingParams(max_tokens=args.output_len, temperature=1.0, ignore_eos=True, seed=11)
        row_params = {"random tokens, sampled": sampled}
        rows = [("repetitive", 1, rep[:3], "default"), ("random tokens", 1, rnd[:3], "default"),
                ("random tokens, sampled", 1, rnd[:3], "default")]
        rows += [("repetitive, forced at any batch", c, rep[:c], "forced") for c in conc if c > 1]
        if max(conc) > 1:
            rows.append(("repetitive, default rule", max(conc), rep[:max(conc)], "default"))
        tps = {}
        specs = {mode: configs(args, mode) for mode in MODES}
        names = list(specs["default"])
        for name in names:
            for mode in MODES:
                if name == "none" and mode != "default":
                    continue
                with group(args, 1, specs[mode][name]) as g:
                    g.engine.generate(rep[:2], SamplingParams(max_tokens=8, temperature=0.0))  # warm-up
                    seen = set()
                    for label, c, prompts, want in rows:
                        if name == "none":  # without speculation the rule means nothing: one baseline per c
                            label = base_of(label)
                            if (label, c) in seen:
                                continue
                            seen.add((label, c))
                        elif want != mode:
                            continue
                        got = [timed(g, prompts, row_params.get(label, params), c) for _ in range(args.repeats)]
                        tps[(name, label, c)] = [n / s for s, n, _, _ in got]
                        sp = got[-1][2]
                        tps[(name, label, c, "acc")] = (sp["spec_accepted_tokens"] / max(sp["spec_draft_tokens"], 1),
                                                        1 + sp["spec_accepted_tokens"] / max(sp["spec_drafts"], 1))
        head = "| workload | concurrency | no speculation tok/s | " + " | ".join(
            f"{n} tok/s | {n} vs none | {n} acceptance, tokens per verify" for n in names[1:]) + " |"
        print(head + "\n|---|---:|---:|" + "---:|---:|---:|" * (len(names) - 1))
        for label, c, _, _ in rows:
            base = tps[("none", base_of(label), c)]
            cells = [fmt(base)]
            for n in names[1:]:
                x = tps[(n, label, c)]
                ratio = [a / statistics.median(base) for a in x]
                acc, length = tps[(n, label, c, "acc")]
                cells += [fmt(x), f"{statistics.median(ratio):.2f}x ({min(ratio):.2f}-{max(ratio):.2f})",
                          f"{acc:.0%}, {length:.2f}"]
            print(f"| {label} | {c} | " + " | ".join(cells) + " |")
        if args.llama_cpp:
            llama_rows(args, rep[:3], {n: statistics.median(tps[(n, "repetitive", 1)]) for n in names})
    print(f"\n{time.perf_counter() - t0:.0f} s")


def llama_rows(args, prompts: list[list[int]], ours: dict[str, float]) -> None:
    """llama.cpp at batch 1 on `prompts`, without and with its lookup decoding, against `ours`
    (tpserve's batch-1 repetitive tok/s by method, this run)."""
    from benchmarks.peers import PEERS_PY, llama_cpp
    from workers.model_source import builtin_gguf

    if not PEERS_PY.exists():
        raise SystemExit(f"{PEERS_PY} is missing: run `make bench-peers` (it builds llama-cpp-python once)")
    gguf = builtin_gguf(args.model)
    got = {}
    # llama-cpp-python's default proposal length (10) and ours (--k).
    for label, k in (("plain", 0), (f"lookup, {args.k} proposed", args.k), ("lookup, 10 proposed", 10)):
        got[label] = llama_cpp(gguf, {"op": "lookup", "prompts": prompts, "new_tokens": args.output_len,
                                      "num_pred_tokens": k, "repeats": args.repeats})["tok_s"]
    best = max(ours, key=ours.get)
    print(f"\nllama.cpp ({gguf.name}, llama-cpp-python's Llama.generate, 2 threads), batch 1, the repetitive "
          f"workload's first {len(prompts)} prompts, {args.output_len} tokens each, greedy:\n")
    print("| system | tok/s | vs llama.cpp plain | tpserve's best batch-1 setting vs it |\n|---|---:|---:|---:|")
    plain = statistics.median(got["plain"])
    for label, xs in got.items():
        print(f"| llama.cpp {label} | {fmt(xs)} | {statistics.median(xs) / plain:.2f}x | "
              f"{ours[best] / statistics.median(xs):.2f}x |")
    for n, v in ours.items():
        print(f"| tpserve {args.dtype} {args.quantization}, {n} | {v:.2f} | {v / plain:.2f}x | |")


if __name__ == "__main__":
    main()

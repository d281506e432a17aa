"""Routing policies side by side on one machine: two replicas, each policy, the same requests.

    python -m benchmarks.routing [--policies kv-aware,least-load,round-robin] [--repeats 3]
                                 [--tenants 8 --prefix-len 256] [--rate 2.0] [--out routing.json]
                                 [--plot docs/routing.png]

For each repeat (seed = repeat) and each policy (the order rotates), one `tpserve serve
--replicas 2 --tp 1 --routing P` runs three workloads in turn:

- multi-tenant: T tenants x a system prompt of --prefix-len tokens, then short questions, tenants
  drawn at random per request (interleaved), Poisson arrivals at --rate;
- conversation: sessions of --turns turns, each turn's prompt = the previous prompt + its answer +
  a new question, sent as token ids; sessions arrive at --rate / --turns;
- random: no sharing at all (the control), Poisson at --rate.

Each replica's KV cache holds 60% of all the tenants' system prompts (counted in blocks), so no
replica can keep every tenant: where a prefix lives matters. The two replicas together hold 120%,
so a policy that partitions tenants can keep them all.

Prints per policy and workload TTFT p50/p90, output tok/s and prefix hit rate (median of the
repeats, with min-max), and the ideal hit rate: the share of prompt tokens, in whole blocks, that
an earlier request had already computed and that a cluster-wide LRU of the cluster's total blocks
would still hold.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
from collections import OrderedDict

from workers import set_openmp_env  # noqa: E402
set_openmp_env()

from cluster.bench.local_server import running_server  # noqa: E402
from cluster.bench.metrics import summarize  # noqa: E402
from cluster.bench.runner import LoadSpec, run_load  # noqa: E402
from cluster.bench.workload import BenchRequest, WorkloadSpec, make_workload  # noqa: E402

POLICIES = ("kv-aware", "least-load", "round-robin")
BLOCK = 16
VOCAB = 49152
# SmolLM2-135M, fp32: 2 (K, V) x 30 layers x 16 tokens x 3 KV heads x 64 dims x 4 bytes.
BYTES_PER_BLOCK = 2 * 30 * BLOCK * 3 * 64 * 4


def workloads(args, seed: int) -> dict[str, tuple[list[BenchRequest], LoadSpec]]:
    q, o = (args.question_min, args.question_max), (args.output_min, args.output_max)
    mt = make_workload(WorkloadSpec("multi-tenant", input_range=q, output_range=o, prefix_len=args.prefix_len,
                                    tenants=args.tenants), args.num_requests, VOCAB, seed)
    conv = make_workload(WorkloadSpec("conversation", input_range=q, output_range=o, turns=args.turns),
                         args.conversation_requests, VOCAB, seed)
    rnd = make_workload(WorkloadSpec("random", input_range=(args.question_min, args.prefix_len), output_range=o),
                        args.random_requests, VOCAB, seed)
    return {"multi-tenant": (mt, LoadSpec(request_rate=args.rate, seed=seed, num_requests=len(mt))),
            "conversation": (conv, LoadSpec(request_rate=args.rate / args.turns, seed=seed, num_requests=len(conv))),
            "random": (rnd, LoadSpec(request_rate=args.rate, seed=seed, num_requests=len(rnd)))}


def _chain(tokens: list[int]) -> list[tuple]:
    """Block identities of a token list (its prefix up to each full block), like the engine's keys."""
    return [tuple(tokens[:(i + 1) * BLOCK]) for i in range(len(tokens) // BLOCK)]


def ideal_hit_rate(prompts: list[list[int]], computed: list[list[int]], capacity_blocks: int) -> float:
    """Share of prompt tokens that a perfect cluster-wide cache (LRU of `capacity_blocks`) serves:
    `computed[i]` is what request i leaves computed (its prompt, or prompt + answer)."""
    lru: OrderedDict = OrderedDict()
    hit = total = 0
    for prompt, done in zip(prompts, computed):
        total += len(prompt)
        usable = (len(prompt) - 1) // BLOCK
        for key in _chain(prompt)[:usable]:
            if key not in lru:
                break
            hit += BLOCK
        for key in _chain(done):
            lru[key] = None
            lru.move_to_end(key)
        while len(lru) > capacity_blocks:
            lru.popitem(last=False)
    return hit / total if total else 0.0


def ideal(name: str, reqs: list[BenchRequest], capacity_blocks: int) -> float:
    if name == "conversation":  # a turn's prompt = the previous prompt + answer (stand-in ids) + question
        prompts, computed = [], []
        for s, r in enumerate(reqs):
            prompt = list(r.prompt_ids)
            for t, q in enumerate([None] + list(r.follow_ups)):
                if q is not None:
                    prompt = prompt + answer + list(q)
                answer = [-(s * 1000 + t * 100 + i + 1) for i in range(r.output_len)]
                prompts.append(prompt)
                computed.append(prompt + answer[:-1])  # the last token's KV is never computed
        return ideal_hit_rate(prompts, computed, capacity_blocks)
    prompts = [r.prompt_ids for r in reqs]
    return ideal_hit_rate(prompts, prompts, capacity_blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--prefix-len", type=int, default=256)
    ap.add_argument("--question-min", type=int, default=16)
    ap.add_argument("--question-max", type=int, default=48)
    ap.add_argument("--output-min", type=int, default=8)
    ap.add_argument("--output-max", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--rate", type=float, default=2.0, help="requests/s (multi-tenant and random)")
    ap.add_argument("--num-requests", type=int, default=160, help="multi-tenant requests per run")
    ap.add_argument("--conversation-requests", type=int, default=96)
    ap.add_argument("--random-requests", type=int, default=64)
    ap.add_argument("--cache-share", type=float, default=0.6,
                    help="each replica's KV cache as a share of all tenants' system prompts")
    ap.add_argument("--workloads", default="multi-tenant,conversation,random")
    ap.add_argument("--serve-args", default="", help="more `tpserve serve` flags, space-separated")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    policies = args.policies.split(",")
    names = args.workloads.split(",")
    blocks = int(args.cache_share * args.tenants * args.prefix_len) // BLOCK
    print(f"{args.model}: 2 replicas x tp 1, {os.cpu_count()} cores, {blocks} KV blocks per replica "
          f"({blocks * BLOCK} tokens; {args.tenants} x {args.prefix_len}-token system prompts), rate {args.rate}/s, "
          f"{args.repeats} repeats", flush=True)
    results: dict = {p: {n: [] for n in names} for p in policies}
    ideals: dict = {n: [] for n in names}
    unloaded: list[float] = []
    for rep in range(args.repeats):
        loads = workloads(args, seed=rep)
        for n in names:
            ideals[n].append(ideal(n, loads[n][0], 2 * blocks))
        for p in policies[rep % len(policies):] + policies[:rep % len(policies)]:
            with running_server("--model", args.model, "--tp", "1", "--replicas", "2", "--routing", p,
                                "--kv-cache-memory", str(blocks * BYTES_PER_BLOCK), "--ray-num-cpus", "2",
                                *args.serve_args.split()) as served:
                for n in names:
                    reqs, load = loads[n]
                    records, duration = asyncio.run(run_load(served.target, "tpserve", args.model, reqs, load))
                    s = summarize(records, duration, {})
                    if s["failed"]:
                        raise SystemExit(f"{p} {n}: {s['failed']} requests failed: {s['errors_by_status']}")
                    results[p][n].append(s)
                    print(f"  repeat {rep + 1} {p:<12} {n:<13} TTFT p50 {s['ttft']['median_ms']:7.1f} ms  "
                          f"p90 {s['ttft']['p90_ms']:7.1f} ms  {s['output_token_throughput']:6.1f} tok/s  "
                          f"hit {s['prefix_hit_rate']:.3f}  (ideal {ideals[n][-1]:.3f})", flush=True)
                if p == "least-load":  # its unloaded TTFT: the same kind of requests one at a time
                    alone = workloads(args, seed=1000 + rep)["multi-tenant"][0][:24]
                    records, duration = asyncio.run(run_load(served.target, "tpserve", args.model, alone,
                                                             LoadSpec(concurrency=1)))
                    unloaded.append(summarize(records, duration, {})["ttft"]["median_ms"])
                    print(f"  repeat {rep + 1} least-load unloaded multi-tenant TTFT p50 {unloaded[-1]:.1f} ms",
                          flush=True)
    table = report(results, ideals, policies, names)
    if unloaded:
        table += (f"\nleast-load, multi-tenant, one request at a time: TTFT p50 {_med(unloaded)} ms "
                  f"(the loaded runs' p90 over it: "
                  f"{statistics.median([r['ttft']['p90_ms'] for r in results['least-load'].get('multi-tenant', [])] or [0]) / statistics.median(unloaded):.1f}x)")
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "blocks_per_replica": blocks, "ideal_hit_rate": ideals,
                       "least_load_unloaded_ttft_p50_ms": unloaded,
                       "results": results}, f, indent=1)
    if args.plot:
        plot(results, policies, names, args.plot)


def _med(vals: list[float]) -> str:
    return f"{statistics.median(vals):.0f} ({min(vals):.0f}-{max(vals):.0f})"


def report(results, ideals, policies, names) -> str:
    rows = ["| workload | policy | TTFT p50 ms | TTFT p90 ms | output tok/s | hit rate | hit / ideal |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for n in names:
        ideal_rate = statistics.median(ideals[n])
        for p in policies:
            runs = results[p][n]
            hit = [r["prefix_hit_rate"] for r in runs]
            rows.append(f"| {n} | {p} | {_med([r['ttft']['median_ms'] for r in runs])} | "
                        f"{_med([r['ttft']['p90_ms'] for r in runs])} | "
                        f"{statistics.median([r['output_token_throughput'] for r in runs]):.1f} | "
                        f"{statistics.median(hit):.3f} | {statistics.median(hit) / ideal_rate:.2f} |"
                        if ideal_rate else
                        f"| {n} | {p} | {_med([r['ttft']['median_ms'] for r in runs])} | "
                        f"{_med([r['ttft']['p90_ms'] for r in runs])} | "
                        f"{statistics.median([r['output_token_throughput'] for r in runs]):.1f} | "
                        f"{statistics.median(hit):.3f} | - |")
    if "least-load" in policies and "kv-aware" in policies:
        rows.append("")
        for n in names:
            kv, ll = results["kv-aware"][n], results["least-load"][n]
            r50 = statistics.median([r["ttft"]["median_ms"] for r in kv]) / statistics.median(
                [r["ttft"]["median_ms"] for r in ll])
            r90 = statistics.median([r["ttft"]["p90_ms"] for r in kv]) / statistics.median(
                [r["ttft"]["p90_ms"] for r in ll])
            thr = statistics.median([r["output_token_throughput"] for r in kv]) / statistics.median(
                [r["output_token_throughput"] for r in ll])
            rows.append(f"kv-aware / least-load, {n}: TTFT p50 {r50:.2f}x, p90 {r90:.2f}x, throughput {thr:.2f}x")
    return "\n".join(rows)


def plot(results, policies, names, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6))
    for ax, n in zip(axes if len(names) > 1 else [axes], names):
        for j, (q, hatch) in enumerate((("median_ms", ""), ("p90_ms", "//"))):
            vals = [statistics.median([r["ttft"][q] for r in results[p][n]]) for p in policies]
            lo = [v - min(r["ttft"][q] for r in results[p][n]) for v, p in zip(vals, policies)]
            hi = [max(r["ttft"][q] for r in results[p][n]) - v for v, p in zip(vals, policies)]
            xs = [i + (j - 0.5) * 0.38 for i in range(len(policies))]
            ax.bar(xs, vals, 0.36, yerr=[lo, hi], hatch=hatch, color=["C0", "C1", "C2"][:len(policies)],
                   edgecolor="black", label="p50" if j == 0 else "p90", capsize=3)
        ax.set_xticks(range(len(policies)), policies)
        ax.set_title(n)
        ax.set_ylabel("TTFT (ms)")
    (axes[0] if len(names) > 1 else axes).legend(["p50", "p90 (hatched)"])
    fig.suptitle("TTFT by routing policy (2 replicas x tp 1; median of repeats, bars: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

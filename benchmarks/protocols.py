"""The three front doors of one server, side by side: tpserve.v1 (gRPC), the OpenAI-compatible HTTP
API (SSE, read by the bench's own httpx client) and KServe v2 (gRPC stream), at one concurrency.

    python -m benchmarks.protocols [--model smollm2-135m] [--tp 1] [--concurrency 32] [--repeats 3]

One `tpserve serve`; each repeat runs every protocol in turn (the order rotates) on fresh prompts
of the same random workload (a new seed per run, so no run profits from another's prefix cache).
Prints each protocol's output tok/s and TTFT p50 (median over the repeats, with the range) and
the ratio to tpserve.v1.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics

from workers import set_openmp_env  # noqa: E402
set_openmp_env()

from cluster.bench.local_server import running_server  # noqa: E402
from cluster.bench.metrics import summarize  # noqa: E402
from cluster.bench.runner import LoadSpec, run_load  # noqa: E402
from cluster.bench.workload import WorkloadSpec, make_workload  # noqa: E402

PROTOCOLS = ("tpserve", "openai", "kserve")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    spec = WorkloadSpec("random", input_range=(32, 256), output_range=(32, 96))
    results: dict[str, list[dict]] = {p: [] for p in PROTOCOLS}
    with running_server("--model", args.model, "--tp", str(args.tp), "--max-num-seqs", str(args.concurrency),
                        "--max-queue-len", str(args.concurrency), "--kv-cache-memory", str(512 << 20)) as served:
        target, http, load = served.target, served.http_target, LoadSpec(concurrency=args.concurrency)
        warm = make_workload(spec, args.concurrency, 49152, seed=999)
        for p in PROTOCOLS:
            asyncio.run(run_load(target, p, args.model, warm, load, http_target=http))
        print(f"{args.model}, tp {args.tp}, concurrency {args.concurrency}, {args.num_requests} requests per "
              f"run, {args.repeats} repeats, {os.cpu_count()} cores", flush=True)
        for rep in range(args.repeats):
            order = PROTOCOLS[rep % 3:] + PROTOCOLS[:rep % 3]
            for p in order:
                reqs = make_workload(spec, args.num_requests, 49152, seed=100 * rep + PROTOCOLS.index(p))
                records, duration = asyncio.run(run_load(target, p, args.model, reqs, load, http_target=http))
                s = summarize(records, duration, {})
                if s["failed"]:
                    raise SystemExit(f"{p}: {s['failed']} requests failed: {s['errors_by_status']}")
                results[p].append(s)
                print(f"  repeat {rep + 1} {p:<8} {s['output_token_throughput']:7.1f} tok/s  "
                      f"TTFT p50 {s['ttft']['median_ms']:7.1f} ms", flush=True)

    def med(p, key):
        vals = [key(s) for s in results[p]]
        return statistics.median(vals), min(vals), max(vals)

    base_tput = med("tpserve", lambda s: s["output_token_throughput"])[0]
    base_ttft = med("tpserve", lambda s: s["ttft"]["median_ms"])[0]
    print(f"\n| protocol | output tok/s (median, range) | ratio | TTFT p50 ms (median, range) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for p in PROTOCOLS:
        t, tlo, thi = med(p, lambda s: s["output_token_throughput"])
        f, flo, fhi = med(p, lambda s: s["ttft"]["median_ms"])
        print(f"| {p} | {t:.1f} ({tlo:.1f}-{thi:.1f}) | {t / base_tput:.3f} | {f:.1f} ({flo:.1f}-{fhi:.1f}) | "
              f"{f / base_ttft:.3f} |")


if __name__ == "__main__":
    main()

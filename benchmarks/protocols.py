"""The three front doors of one server, side by side: tpserve.v1 (gRPC), the OpenAI-compatible HTTP
API (SSE, read by the bench's own httpx client) and KServe v2 (gRPC stream), at one concurrency.

    python -m benchmarks.protocols [--model smollm2-135m] [--tp 1] [--concurrency 32] [--repeats 3] [--aiperf]

One `tpserve serve`; each repeat runs every protocol in turn (the order rotates) on fresh prompts
of the same random workload (a new seed per run, so no run profits from another's prefix cache).
Prints each protocol's output tok/s and TTFT p50 (median over the repeats, with the range) and
the ratio to the first of --protocols (tpserve.v1 by default).

--aiperf: also NVIDIA's aiperf (from the benchmark venv, `make bench-clients`) against the OpenAI
API, beside `tpserve bench`'s OpenAI client on the *same* requests each repeat (text prompts, each
client its own `cache_salt`, so neither reuses the other's prefix cache; the two take turns going
first). With the client on a machine of its own the two should agree within the repeats' spread;
on 2 cores shared with the server aiperf's own processes take about half the machine
(docs/benchmarks.md, 2026-12-04: aiperf 0.44-0.48x of tpserve bench).
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
SAME_REQUESTS = ("bench-openai-text", "aiperf")  # --aiperf: two clients, the same requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--aiperf", action="store_true", help="also aiperf and tpserve bench on the same requests")
    ap.add_argument("--protocols", default=",".join(PROTOCOLS),
                    help="which front doors to compare (none: '', with --aiperf for the clients alone)")
    args = ap.parse_args()
    protocols = tuple(p for p in args.protocols.split(",") if p)
    if unknown := set(protocols) - set(PROTOCOLS):
        raise SystemExit(f"--protocols: unknown {', '.join(sorted(unknown))} (from {', '.join(PROTOCOLS)})")
    spec = WorkloadSpec("random", input_range=(32, 256), output_range=(32, 96))
    results: dict[str, list[dict]] = {p: [] for p in PROTOCOLS}
    clients: dict[str, list[dict]] = {c: [] for c in SAME_REQUESTS}
    if args.aiperf:
        from benchmarks.aiperf_client import DEFAULT_BIN, version

        if not DEFAULT_BIN.exists():
            raise SystemExit(f"--aiperf: {DEFAULT_BIN} is missing; `make bench-clients` installs it")
        print(f"aiperf {version()}", flush=True)
    with running_server("--model", args.model, "--tp", str(args.tp), "--max-num-seqs", str(args.concurrency),
                        "--max-queue-len", str(args.concurrency), "--kv-cache-memory", str(512 << 20)) as served:
        target, http, load = served.target, served.http_target, LoadSpec(concurrency=args.concurrency)
        warm = make_workload(spec, args.concurrency, 49152, seed=999)
        for p in protocols or ("openai",):
            asyncio.run(run_load(target, p, args.model, warm, load, http_target=http))
        print(f"{args.model}, tp {args.tp}, concurrency {args.concurrency}, {args.num_requests} requests per "
              f"run, {args.repeats} repeats, {os.cpu_count()} cores", flush=True)
        for rep in range(args.repeats):
            order = protocols[rep % len(protocols):] + protocols[:rep % len(protocols)] if protocols else ()
            for p in order:
                reqs = make_workload(spec, args.num_requests, 49152, seed=100 * rep + PROTOCOLS.index(p))
                records, duration = asyncio.run(run_load(target, p, args.model, reqs, load, http_target=http))
                s = summarize(records, duration, {})
                if s["failed"]:
                    raise SystemExit(f"{p}: {s['failed']} requests failed: {s['errors_by_status']}")
                results[p].append(s)
                print(f"  repeat {rep + 1} {p:<8} {s['output_token_throughput']:7.1f} tok/s  "
                      f"TTFT p50 {s['ttft']['median_ms']:7.1f} ms", flush=True)
            if args.aiperf:
                same_requests(args, spec, rep, target, http, load, clients)

    if args.aiperf:
        print(f"\nThe same requests each repeat (text prompts), OpenAI API, concurrency {args.concurrency}:\n")
        print("| client | output tok/s (median, range) | TTFT p50 ms (median, range) | ITL p50 ms (median, range) |")
        print("|---|---:|---:|---:|")
        for c in SAME_REQUESTS:
            cells = []
            for k in ("output_tok_s", "ttft_p50_ms", "itl_p50_ms"):
                v = [r[k] for r in clients[c]]
                cells.append(f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})")
            print(f"| {c} | " + " | ".join(cells) + " |")

    def med(p, key):
        vals = [key(s) for s in results[p]]
        return statistics.median(vals), min(vals), max(vals)

    if not protocols:
        return
    base = protocols[0]
    base_tput = med(base, lambda s: s["output_token_throughput"])[0]
    base_ttft = med(base, lambda s: s["ttft"]["median_ms"])[0]
    print(f"\n| protocol | output tok/s (median, range) | ratio | TTFT p50 ms (median, range) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for p in protocols:
        t, tlo, thi = med(p, lambda s: s["output_token_throughput"])
        f, flo, fhi = med(p, lambda s: s["ttft"]["median_ms"])
        print(f"| {p} | {t:.1f} ({tlo:.1f}-{thi:.1f}) | {t / base_tput:.3f} | {f:.1f} ({flo:.1f}-{fhi:.1f}) | "
              f"{f / base_ttft:.3f} |")


def same_requests(args, spec, rep: int, target: str, http: str, load, clients: dict[str, list[dict]]) -> None:
    """One repeat of aiperf and tpserve bench's OpenAI client on one list of requests."""
    from dataclasses import replace

    from benchmarks.aiperf_client import run_aiperf
    from workers.model_source import resolve_model

    reqs = [replace(r, prompt_ids=None) for r in make_workload(spec, args.num_requests, 49152, seed=100 * rep + 50)]
    order = SAME_REQUESTS if rep % 2 == 0 else SAME_REQUESTS[::-1]
    for c in order:
        salted = [replace(r, cache_salt=f"{c}-{rep}") for r in reqs]
        if c == "aiperf":
            got = run_aiperf(http, args.model, str(resolve_model(args.model)), salted, args.concurrency,
                             cache_salt=f"{c}-{rep}")
            asked = statistics.mean(r.output_len for r in reqs)
            if abs(got["output_len_mean"] - asked) > 0.5:  # then the two did not run the same requests
                raise SystemExit(f"aiperf counted {got['output_len_mean']:.1f} output tokens per request, "
                                 f"{asked:.1f} were asked")
        else:
            records, duration = asyncio.run(run_load(target, "openai", args.model, salted, load, http_target=http))
            s = summarize(records, duration, {})
            if s["failed"]:
                raise SystemExit(f"{c}: {s['failed']} requests failed: {s['errors_by_status']}")
            got = {"output_tok_s": s["output_token_throughput"], "ttft_p50_ms": s["ttft"]["median_ms"],
                   "itl_p50_ms": s["itl"]["median_ms"]}
        clients[c].append(got)
        print(f"  repeat {rep + 1} {c:<18} {got['output_tok_s']:7.1f} tok/s  TTFT p50 {got['ttft_p50_ms']:7.1f} ms",
              flush=True)


if __name__ == "__main__":
    main()

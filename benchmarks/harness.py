"""The harness must not be the bottleneck: one harness process against a server that answers at once.

    python -m benchmarks.harness

A scripted tpserve.v1 server with zero delays streams every token immediately (in its own
process, so the two do not share an event loop); the harness drives it closed loop. Prints
streamed tokens/s (target >= 2,000) and requests/s (target >= 200), and the harness's own
per-chunk cost.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import time


def _serve(port_q) -> None:
    from cluster.bench import scripted_server

    async def main():
        server, port = await scripted_server.start(first_s=0.0, gap_s=0.0, slow_first_s=0.0)
        port_q.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


def measure(port: int, n: int, tokens: int, concurrency: int) -> tuple[float, float]:
    from cluster.bench.metrics import summarize
    from cluster.bench.runner import LoadSpec, run_load
    from cluster.bench.workload import BenchRequest

    reqs = [BenchRequest([1, 2, 3], "", tokens) for _ in range(n)]
    records, duration = asyncio.run(run_load(f"127.0.0.1:{port}", "tpserve", "fake", reqs,
                                             LoadSpec(concurrency=concurrency)))
    s = summarize(records, duration, {"ttft": None, "tpot": None, "e2e": None})
    assert s["completed"] == n
    return s["output_token_throughput"], s["request_throughput"]


def main() -> None:
    from cluster.bench.runner import harness_overhead_ms

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_serve, args=(q,), daemon=True)
    proc.start()
    port = q.get(timeout=60)
    try:
        measure(port, 50, 8, 8)  # warm-up
        t = time.perf_counter()
        tok_s, _ = measure(port, 200, 64, 32)
        _, req_s = measure(port, 2000, 1, 64)
        print(f"one harness process against an instant server (2 cores shared with it), {time.perf_counter() - t:.1f}s:")
        print(f"  streamed tokens/s : {tok_s:,.0f}  (200 requests x 64 tokens, concurrency 32; target >= 2,000)")
        print(f"  requests/s        : {req_s:,.0f}  (2,000 one-token requests, concurrency 64; target >= 200)")
        print(f"  client-side work per timed chunk: {harness_overhead_ms() * 1e3:.2f} us")
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()

"""The cluster path against the offline engine, on the same requests, in one run.

    python -m benchmarks.cluster [--model smollm2-135m] [--tp 1] [--num-requests 64]

1. Offline: the engine in this process, all requests at once (the throughput benchmark's
   decode-heavy mix, seed 0, each request emits exactly its output length).
2. Cluster: `tpserve serve` (embedded Ray, one replica) on 127.0.0.1, the same requests sent as
   streaming tpserve.v1 Generate calls at concurrency = number of requests.
Prints output tokens/s of each and the ratio (target >= 0.9), then time-to-first-token at low
load (one request at a time, client-side) against the offline engine's time to first token for
the same prompt (its prefill step).
"""
from __future__ import annotations

import argparse
import os
import threading
import time

from workers import set_openmp_env  # noqa: E402
set_openmp_env()

from cluster.bench.local_server import running_server  # noqa: E402
from benchmarks.throughput import engine_run, make_requests  # noqa: E402
from workers.engine.core import EngineConfig  # noqa: E402
from workers.engine.sampling_params import SamplingParams  # noqa: E402
from workers.launcher import start_worker_group  # noqa: E402
from workers.model_source import resolve_model  # noqa: E402
from workers.worker import WorkerSpec  # noqa: E402

KV = 3 << 30


def offline(folder, reqs, low_load) -> tuple[float, list[float]]:
    spec = WorkerSpec(str(folder), kv_cache_memory=KV)
    with start_worker_group(spec, EngineConfig(max_num_seqs=len(reqs), max_num_batched_tokens=1024)) as g:
        engine_run(g, reqs[:4])  # warm-up
        n, t = engine_run(g, reqs)
        ttfts = []
        for r in low_load:
            t0 = time.perf_counter()
            next(iter(g.engine.add_request(r.prompt, SamplingParams(max_tokens=1, temperature=0.0))))
            ttfts.append(time.perf_counter() - t0)
    return n / t, ttfts


def through_cluster(target: str, reqs, low_load) -> tuple[float, list[float], int]:
    import grpc

    from cluster.api.tpserve.v1 import tpserve_pb2 as pb
    from cluster.api.tpserve.v1 import tpserve_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(target)
    stub = pb_grpc.TpserveServiceStub(channel)

    def request(r, max_tokens=None):
        return pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=r.prompt), sampling=pb.SamplingParameters(
            max_tokens=max_tokens or r.out_len, temperature=0, ignore_eos=True))

    for r in reqs[:4]:  # warm-up
        list(stub.Generate(request(r, 4), timeout=300))
    counts, errors = [0] * len(reqs), []

    def run(i):
        try:
            for m in stub.Generate(request(reqs[i]), timeout=1800):
                counts[i] += len(m.token_ids)
        except grpc.RpcError as e:
            errors.append(e.code().name)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t
    ttfts = []
    for r in low_load:
        t0 = time.perf_counter()
        next(iter(stub.Generate(request(r, 1), timeout=300)))
        ttfts.append(time.perf_counter() - t0)
    channel.close()
    if errors:
        raise SystemExit(f"{len(errors)} requests failed: {sorted(set(errors))}")
    return sum(counts) / elapsed, ttfts, sum(counts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--num-requests", type=int, default=64)
    args = ap.parse_args()
    folder = resolve_model(args.model)
    reqs = make_requests("decode", args.num_requests, 49152)
    low_load = make_requests("decode", 8, 49152, seed=3)
    print(f"model {args.model}, tp {args.tp}, {len(reqs)} requests (decode-heavy mix, seed 0), "
          f"{sum(r.out_len for r in reqs)} output tokens, {os.cpu_count()} cores", flush=True)
    off_rate, off_ttft = offline(folder, reqs, low_load)
    with running_server("--model", args.model, "--tp", str(args.tp), "--kv-cache-memory", str(KV),
                        "--max-num-seqs", str(len(reqs)), "--max-num-batched-tokens", "1024") as served:
        rate, ttft, tokens = through_cluster(served.target, reqs, low_load)
    assert tokens == sum(r.out_len for r in reqs)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"{'path':<46}{'output tok/s':>13}{'ratio':>8}")
    print(f"{'offline engine, all at once':<46}{off_rate:>13.1f}{1:>8.2f}")
    print(f"{'cluster: gRPC Generate, concurrency ' + str(len(reqs)):<46}{rate:>13.1f}{rate / off_rate:>8.2f}")
    print(f"time to first token at low load (median of {len(low_load)}): cluster {med(ttft) * 1e3:.1f} ms, "
          f"offline engine {med(off_ttft) * 1e3:.1f} ms (prefill), overhead {(med(ttft) - med(off_ttft)) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()

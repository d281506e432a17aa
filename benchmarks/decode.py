"""Decode latency at batch 1: tpserve at tp 1, 2, 3 against transformers' generate, in one run.

    python -m benchmarks.decode [--model smollm2-135m] [--tps 1,2,3] [--new-tokens 64]
                                [--quantizations none,int8,int4] [--dtypes float32,bfloat16]
                                [--collectives shm,gloo] [--compile off,on]

Prints ms per generated token (prefill excluded: timed as (t(N) - t(1)) / (N - 1)), the share
of rank 0's decode time spent inside collectives (all-reduce and the logits gather, which
includes waiting for slower ranks), and each figure's ratio to transformers. With
--quantizations, each tp runs once per quantization, and each row also shows the weights' bytes
per rank and the read-bandwidth floor: those bytes / the read bandwidth measured here (a sum over
a 512 MiB tensor, the way a GEMV reads its weight, in 2 MiB pages as a rank holds its weights).
Those are the bytes a rank holds: for int4 they include two kernels' copies of each projection
(PyTorch's packed codes for prefill chunks, tpserve::int4_gemv's for decode) of which a decode step
reads one, so for int4 the column is not a floor (docs/benchmarks.md, thirteenth session, works
out the bytes read).
With --collectives shm,gloo, each tp > 1 runs once per CPU transport (shared memory, or gloo's
TCP loopback). With --dtypes, once per model dtype (a quantized bfloat16 model runs its residual
stream in bf16; a float32 one casts around the int kernels). Every configuration runs in processes of its own (`LocalWorkerGroup`, tp 1 included).
"""
from __future__ import annotations

import argparse
import os
import time

from workers import set_openmp_env  # noqa: E402
set_openmp_env()

import torch  # noqa: E402

from cluster.planner.profile import read_bandwidth_gbs  # noqa: E402,F401  (the planner's own measure)
from workers.engine.sampling_params import SamplingParams  # noqa: E402
from workers.launcher import LocalWorkerGroup, threads_per_rank  # noqa: E402
from workers.model_source import resolve_model  # noqa: E402
from workers.worker import WorkerSpec  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."


def per_token_ms(run, n: int, repeats: int) -> float:
    """Median over repeats of (t(n) - t(1)) / (n - 1): decode time without the prefill."""
    samples = []
    for _ in range(repeats):
        t = time.perf_counter(); run(1); t1 = time.perf_counter() - t
        t = time.perf_counter(); run(n); tn = time.perf_counter() - t
        samples.append((tn - t1) / (n - 1) * 1e3)
    return sorted(samples)[len(samples) // 2]


def bench_transformers(folder, ids: list[int], n: int, repeats: int) -> float:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads_per_rank(1))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    x = torch.tensor([ids])

    def run(k):
        with torch.no_grad():
            model.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)

    run(4)  # warm-up
    return per_token_ms(run, n, repeats)


def bench_tpserve(folder, tp: int, ids: list[int], n: int, repeats: int, quantization: str = "none",
                  collectives: str = "shm", dtype: str = "float32", compile: bool = False) -> tuple[float, float, int]:
    spec = WorkerSpec(str(folder), tp_size=tp, quantization=quantization, cpu_collectives=collectives, dtype=dtype,
                      compile=compile)
    # Its own processes even at tp 1: compiled functions (and dynamo's recompile counts) are
    # process-wide, so configurations sharing this process would compile against each other.
    with LocalWorkerGroup(spec) as group:
        def run(k):
            group.engine.generate([ids], SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True))

        run(4)
        ms = per_token_ms(run, n, repeats)
        group.call("set_comm_timing", True)
        t = time.perf_counter(); run(n); total = time.perf_counter() - t
        comm = group.call("set_comm_timing", False)
        weights = max(r["param_bytes"] for r in group.reports)
    return ms, comm / total, weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tps", default="1,2,3")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quantizations", default="none")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--collectives", default="shm", help="CPU transports for tp > 1: shm, gloo or both")
    ap.add_argument("--compile", default="off", help="off, on, or off,on (each configuration both ways)")
    args = ap.parse_args()
    folder = resolve_model(args.model)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(folder))(PROMPT).input_ids
    print(f"model {args.model}, prompt {len(ids)} tokens, {args.new_tokens} new tokens, batch 1, float32, "
          f"{os.cpu_count()} cores, torch {torch.__version__}")
    hf = bench_transformers(folder, ids, args.new_tokens, args.repeats)
    gbs = read_bandwidth_gbs()
    print(f"read bandwidth (sum over 512 MiB in 2 MiB pages): {gbs:.1f} GB/s")
    rows = [("transformers generate", hf, None, None)]
    for dtype in args.dtypes.split(","):
        for q in args.quantizations.split(","):
            for tp in [int(t) for t in args.tps.split(",")]:
                for c in args.collectives.split(",") if tp > 1 else ["-"]:
                    for comp in args.compile.split(","):
                        ms, comm, weights = bench_tpserve(folder, tp, ids, args.new_tokens, args.repeats, q,
                                                          "shm" if c == "-" else c, dtype, comp == "on")
                        name = f"tpserve tp={tp} {dtype[:4]} {q}" + ("" if c == "-" else f" {c}") + \
                            (" compiled" if comp == "on" else "")
                        rows.append((name, ms, comm, weights))
    print(f"{'system':<36}{'ms/token':>10}{'collectives':>13}{'vs transformers':>17}{'weights/rank':>14}"
          f"{'floor ms':>10}{'x floor':>9}")
    for name, ms, comm, weights in rows:
        share = "-" if comm is None else f"{comm:.0%}"
        floor = "" if weights is None else f"{weights / 2**20:>10.0f} MiB{weights / gbs / 1e6:>10.1f}" \
                                            f"{ms / (weights / gbs / 1e6):>8.2f}x"
        print(f"{name:<36}{ms:>10.1f}{share:>13}{hf / ms:>16.2f}x{floor}")


if __name__ == "__main__":
    main()

"""The offline engine at this checkout against another git revision, each run in a fresh process.

    python -m benchmarks.engine_ab [--base HEAD~1] [--dtype bfloat16] [--repeats 3] [--requests 64]

The same requests as `benchmarks.throughput`'s decode mix (prompts 16-128, outputs 128-256, exact
lengths, greedy, EOS ignored) all at once, SmolLM2 at tp 1, stepped on the process's main thread
(the engine a `start_worker_group` tp 1 group runs, without its thread: docs/benchmarks.md, seventh
session). The base revision is checked out into a temporary git worktree; the two alternate, one
fresh process each (this machine's speed drifts by 10-20% over minutes, so only interleaved runs
compare). Prints each run's output tokens/s and ms per step, each side's median, and the ratio.

What a run measures is limited to what both trees have: the engine core, the worker and the
throughput benchmark's requests (revisions from 2026-12-05 on).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in the tree under test (PYTHONPATH), so it may only use what both revisions have.
CHILD = r"""
import sys, time
from workers import set_openmp_env
set_openmp_env()
import torch
from benchmarks.throughput import make_requests
from workers.engine.core import EngineConfig, EngineCore
from workers.engine.executor import WorkerExecutor
from workers.engine.sampling_params import SamplingParams
from workers.model_source import resolve_model
from workers.rank import load_detokenizer
from workers.worker import Worker, WorkerSpec

dtype, n = sys.argv[1], int(sys.argv[2])
folder = str(resolve_model("smollm2-135m"))
worker = Worker(WorkerSpec(folder, tp_size=1, dtype=dtype, kv_cache_memory=1 << 30), 0)
torch.set_num_threads(2)
engine = EngineCore(WorkerExecutor(worker), load_detokenizer(folder),
                    EngineConfig(max_num_seqs=n, max_num_batched_tokens=1024))
reqs = make_requests("decode", n, worker.config.vocab_size)
for warm in (make_requests("decode", 4, worker.config.vocab_size, seed=99), reqs):  # the first warms up
    for i, r in enumerate(warm):
        engine.add_request(f"{warm is reqs}-{i}", r.prompt,
                           SamplingParams(max_tokens=r.out_len, temperature=0.0, ignore_eos=True))
    steps0, t = engine.stats.steps, time.perf_counter()
    while engine.has_work():
        engine.step()
    seconds = time.perf_counter() - t
print(f"RESULT {sum(r.out_len for r in reqs) / seconds:.1f} {seconds / (engine.stats.steps - steps0) * 1e3:.1f}")
worker.close()
"""


def run(tree: Path, dtype: str, n: int) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", CHILD, dtype, str(n)], cwd=tree, env=env, capture_output=True,
                         text=True, timeout=1800)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise SystemExit(f"the run in {tree} failed:\n{out.stderr[-3000:]}")
    tok_s, ms = line.split()[1:]
    return float(tok_s), float(ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD~1", help="the git revision to compare against")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64)
    args = ap.parse_args()
    rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="tpserve-ab-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), rev], cwd=ROOT, check=True)
        try:
            results: dict[str, list[tuple[float, float]]] = {"base": [], "current": []}
            print(f"`python -m benchmarks.engine_ab --base {args.base} --dtype {args.dtype}`: base {rev}, "
                  f"current {head} (uncommitted changes included), {args.requests} requests\n")
            print("| run | side | output tok/s | ms/step |")
            print("|---:|---|---:|---:|")
            for i in range(args.repeats):
                for side, tree in (("base", base), ("current", ROOT)):
                    tok_s, ms = run(tree, args.dtype, args.requests)
                    results[side].append((tok_s, ms))
                    print(f"| {i + 1} | {side} | {tok_s:.1f} | {ms:.1f} |", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    med = {side: statistics.median(t for t, _ in r) for side, r in results.items()}
    spread = {side: (min(t for t, _ in r), max(t for t, _ in r)) for side, r in results.items()}
    print(f"\nmedian output tok/s: base {med['base']:.1f} ({spread['base'][0]:.1f}-{spread['base'][1]:.1f}), "
          f"current {med['current']:.1f} ({spread['current'][0]:.1f}-{spread['current'][1]:.1f}); "
          f"current / base {med['current'] / med['base']:.2f}x")


if __name__ == "__main__":
    main()

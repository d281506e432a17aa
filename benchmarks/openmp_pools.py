"""Small torch ops on one thread, and on a second thread of a process whose first thread already ran
parallel torch ops (two OpenMP thread pools in one process).

    python -m benchmarks.openmp_pools

libgomp keeps a pool of worker threads per thread that opens parallel regions. Once its managed
threads outnumber the CPUs, it stops spinning before a worker sleeps, so every parallel region
pays a futex wake. Each case runs in a fresh process: the ops on the main thread alone, on a
second thread alone, and on a second thread after the main thread ran them. Prints microseconds
per op (the median of 5 batches of 2,000).
"""
from __future__ import annotations

import subprocess
import sys

CASE = r"""
import statistics, sys, threading, time
from workers import set_openmp_env
set_openmp_env()
import torch
x = torch.randn(64, 576, dtype=torch.bfloat16)
ops = {"add": lambda: x + x, "softmax": lambda: torch.softmax(x.float(), -1)}
def bench(out):
    for name, f in ops.items():
        for _ in range(100): f()
        runs = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(2000): f()
            runs.append((time.perf_counter() - t) / 2000 * 1e6)
        out[name] = statistics.median(runs)
case, out = sys.argv[1], {}
if case != "second thread alone":
    bench(out)
if case != "main thread":
    t = threading.Thread(target=bench, args=(out,)); t.start(); t.join()
print(out["add"], out["softmax"])
"""


def main() -> None:
    print("`python -m benchmarks.openmp_pools`: microseconds per op, bf16 [64, 576], torch's threads\n")
    print("| where the ops run | add | softmax (fp32) |")
    print("|---|---:|---:|")
    for case in ("main thread", "second thread alone", "second thread, after the main thread's"):
        out = subprocess.run([sys.executable, "-c", CASE, case], capture_output=True, text=True, check=True)
        add, softmax = (float(v) for v in out.stdout.split())
        print(f"| {case} | {add:.1f} | {softmax:.1f} |", flush=True)


if __name__ == "__main__":
    main()

"""`tpserve::gemv` against PyTorch's kernels on SmolLM2's shapes, weights read from memory, in one run.

    python -m benchmarks.gemv [--rows 1,4] [--threads 2] [--repeats 5]

Each kernel multiplies 1 or 4 rows by every one of N copies of a weight (copies adding up to 256
MiB, past any cache, as a model's step streams its weights), best of --repeats passes, the
kernels' passes interleaved. Per shape: microseconds per call and the weight's bytes over that
time (GB/s), against `_weight_int8pack_mm` (bf16 x, as the int8 layers call it) for int8 codes and
F.linear for float32 and bfloat16 weights. The run's read bandwidth (a sum over 1 GiB) is printed
beside them.
"""
from __future__ import annotations

import argparse
import time

from workers import set_openmp_env

set_openmp_env()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from workers import cpu_kernels  # noqa: E402

SHAPES = {"qkv_proj": (960, 576), "o_proj": (576, 576), "gate_up_proj": (3072, 576), "down_proj": (576, 1536),
          "lm_head": (49152, 576)}
STREAM_BYTES = 256 << 20


def timed(calls: dict[str, tuple], repeats: int) -> dict[str, float]:
    """Microseconds per call of each (fn, weights), best of `repeats` interleaved passes."""
    best = {name: float("inf") for name in calls}
    for fn, ws in calls.values():
        fn(ws[0]), fn(ws[1])
    for rep in range(repeats):
        for name in (list(calls) if rep % 2 == 0 else reversed(list(calls))):
            fn, ws = calls[name]
            t = time.perf_counter()
            for w in ws:
                fn(w)
            best[name] = min(best[name], (time.perf_counter() - t) / len(ws) * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not cpu_kernels.available():
        raise SystemExit("tpserve's CPU kernels are not built here (no C++ compiler?)")
    torch.set_num_threads(args.threads)
    big = torch.randn(1 << 28)
    big.sum()
    t = time.perf_counter()
    for _ in range(3):
        big.sum()
    read_bw = 3 * big.numel() * 4 / (time.perf_counter() - t) / 1e9
    del big
    print(f"`python -m benchmarks.gemv --rows {args.rows} --threads {args.threads} --repeats {args.repeats}`, "
          f"{time.strftime('%Y-%m-%d')}, read bandwidth {read_bw:.1f} GB/s (sum over 1 GiB)\n")
    print("| layer (N x K) | rows | weight | tpserve::gemv us (GB/s) | PyTorch us (GB/s) | PyTorch / gemv |")
    print("|---|---:|---|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for layer, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=gen) * 0.05
        codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        scale = torch.rand(n, generator=gen) * 0.01
        for rows in map(int, args.rows.split(",")):
            xf = torch.randn(rows, k, generator=gen)
            xb = xf.bfloat16()
            for fmt, weight, ours, theirs in (
                ("int8", codes, lambda c: torch.ops.tpserve.gemv(xb, c, scale),
                 lambda c: torch.ops.aten._weight_int8pack_mm(xb, c, scale.bfloat16())),
                ("float32", w, lambda c: torch.ops.tpserve.gemv(xf, c, None), lambda c: F.linear(xf, c)),
                ("bfloat16", w.bfloat16(), lambda c: torch.ops.tpserve.gemv(xb, c, None), lambda c: F.linear(xb, c)),
            ):
                nbytes = weight.numel() * weight.element_size()
                copies = [weight] + [weight.clone() for _ in range(max(1, STREAM_BYTES // nbytes) - 1)]
                if len(copies) < 2:
                    copies.append(weight.clone())
                us = timed({"ours": (ours, copies), "theirs": (theirs, copies)}, args.repeats)
                print(f"| {layer} ({n} x {k}) | {rows} | {fmt} | {us['ours']:.1f} ({nbytes / us['ours'] / 1e3:.1f}) | "
                      f"{us['theirs']:.1f} ({nbytes / us['theirs'] / 1e3:.1f}) | {us['theirs'] / us['ours']:.2f}x |",
                      flush=True)
                del copies


if __name__ == "__main__":
    main()

"""oneDNN on a prepacked weight against F.linear (and `tpserve::gemv` at up to 4 rows) on SmolLM2's
shapes, weights read from memory, in one run.

    python -m benchmarks.onednn_linear [--rows 1,4,16,64,256] [--dtypes float32,bfloat16] [--threads 2]

F.linear hands oneDNN the plain weight [out, in], which it reorders on every call;
`linear_method.onednn_linear` multiplies on a copy packed once (`onednn_pack`), as plain layers do
where the start-up probe picks it. Each kernel multiplies the rows by every one of N copies of a
weight (adding up to 256 MiB, as a step streams its weights; `benchmarks.gemv`), best of --repeats
interleaved passes. Per shape and row count: microseconds per call, and F.linear / packed. The last
rows of each table sum one decode step's matmuls (30 layers and the LM head).
"""
from __future__ import annotations

import argparse
import time

from workers import set_openmp_env

set_openmp_env()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.gemv import SHAPES, STREAM_BYTES, timed  # noqa: E402
from workers import cpu_kernels  # noqa: E402
from workers.layers.linear_method import onednn_available, onednn_linear, onednn_pack  # noqa: E402

LAYERS = 30  # SmolLM2's decoder layers: every projection but the LM head runs once per layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,16,64,256")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gemv = cpu_kernels.available()
    print(f"`python -m benchmarks.onednn_linear --rows {args.rows} --dtypes {args.dtypes} --threads {args.threads} "
          f"--repeats {args.repeats}`, {time.strftime('%Y-%m-%d')}\n")
    gen = torch.Generator().manual_seed(0)
    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        if not onednn_available(dtype):
            print(f"oneDNN has no {dtype} here\n")
            continue
        print(f"**{str(dtype).removeprefix('torch.')}**, microseconds per call\n")
        print("| layer (N x K) | rows | F.linear | oneDNN packed | tpserve::gemv | F.linear / packed |")
        print("|---|---:|---:|---:|---:|---:|")
        step: dict[int, dict[str, float]] = {}
        for layer, (n, k) in SHAPES.items():
            w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
            nbytes = w.numel() * w.element_size()
            copies = [w] + [w.clone() for _ in range(max(2, STREAM_BYTES // nbytes) - 1)]
            packed = [onednn_pack(c) for c in copies]
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, k, generator=gen).to(dtype)
                calls = {"linear": (lambda c: F.linear(x, c), copies),
                         "packed": (lambda p: onednn_linear(x, p), packed)}
                if gemv and rows <= 4:
                    calls["gemv"] = (lambda c: torch.ops.tpserve.gemv(x, c, None), copies)
                us = timed(calls, args.repeats)
                times = 1 if layer == "lm_head" else LAYERS
                for name, t in us.items():
                    step.setdefault(rows, {}).setdefault(name, 0.0)
                    step[rows][name] += t * times
                g = f"{us['gemv']:.1f}" if "gemv" in us else "-"
                print(f"| {layer} ({n} x {k}) | {rows} | {us['linear']:.1f} | {us['packed']:.1f} | {g} | "
                      f"{us['linear'] / us['packed']:.2f}x |", flush=True)
            del copies, packed
        for rows, sums in step.items():
            g = f"{sums['gemv'] / 1e3:.2f} ms" if "gemv" in sums else "-"
            print(f"| one step's matmuls | {rows} | {sums['linear'] / 1e3:.2f} ms | {sums['packed'] / 1e3:.2f} ms | "
                  f"{g} | {sums['linear'] / sums['packed']:.2f}x |")
        print()


if __name__ == "__main__":
    main()

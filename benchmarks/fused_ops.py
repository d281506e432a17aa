"""Each fused CPU op (workers/fused_ops.py) against the PyTorch ops it replaces, in one process.

    python -m benchmarks.fused_ops [--repeats 200]

SmolLM2's widths (hidden 576, 9 query and 3 KV heads of 64, intermediate 1536, vocabulary 49152)
at 1, 64 and 1024 rows (batch-1 decode, a 64-sequence decode step, a prefill chunk), float32 and
bfloat16, 2 threads. Each case alternates the two forms; prints median microseconds per call and
the ratio. The PyTorch forms are the model's own code with the fused ops switched off
(`TPSERVE_FUSED_OPS=off`), so the comparison is what a step saves per call.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from workers import set_openmp_env  # noqa: E402
set_openmp_env()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from workers import cpu_kernels, fused_ops  # noqa: E402
from workers.layers.norm import RMSNorm  # noqa: E402
from workers.layers.rotary import RotaryEmbedding  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1e6


def cases(rows: int, dtype: torch.dtype):
    """(name, call) pairs; each call runs the model's code, fused or not by the environment."""
    g = torch.Generator().manual_seed(rows)
    norm = RMSNorm(576, 1e-5, dtype)
    norm.weight.data.copy_(torch.rand(576, generator=g) + 0.5)
    x, residual = torch.randn(rows, 576, generator=g).to(dtype), torch.randn(rows, 576, generator=g).to(dtype)
    qkv = torch.randn(rows, 960, generator=g).to(dtype)
    q, k = qkv[:, :576].view(rows, 9, 64), qkv[:, 576:768].view(rows, 3, 64)
    cos, sin = RotaryEmbedding(64, 8192, 100000.0, None).cos_sin(torch.randint(0, 8192, (rows,), generator=g))
    gate_up = torch.randn(rows, 3072, generator=g).to(dtype)

    def silu_mul():
        if fused_ops.serves(gate_up):
            return torch.ops.tpserve.silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    yield "add + RMSNorm", lambda: norm.add_forward(x, residual)
    yield "rotary (q and k)", lambda: RotaryEmbedding.rotate(q, k, cos, sin)
    yield "SiLU and multiply", silu_mul
    if rows <= 64:
        logits = torch.randn(rows, 49152, generator=g).to(dtype)
        # The sampler's greedy pick: before, a float32 copy of the logits, then torch.argmax.
        yield "greedy argmax", lambda: (fused_ops.greedy(logits) if fused_ops.serves(logits)
                                        else logits.float().argmax(-1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    if not cpu_kernels.available():
        raise SystemExit("tpserve's CPU kernels are not available here")
    torch.set_num_threads(2)
    print(f"`python -m benchmarks.fused_ops --repeats {args.repeats}`, 2 threads; median us per call of 5 "
          f"alternating batches\n")
    print("| op | dtype | rows | PyTorch ops | fused | fused / PyTorch |")
    print("|---|---|---:|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (1, 64, 1024):
            for name, call in cases(rows, dtype):
                times: dict[str, list[float]] = {"off": [], "on": []}
                for _ in range(5):
                    for mode in ("off", "on"):
                        os.environ["TPSERVE_FUSED_OPS"] = mode
                        times[mode].append(timed(call, max(10, args.repeats * 64 // max(rows, 64))))
                off, on = statistics.median(times["off"]), statistics.median(times["on"])
                print(f"| {name} | {str(dtype).split('.')[1]} | {rows} | {off:.1f} | {on:.1f} | {on / off:.2f}x |",
                      flush=True)
    os.environ.pop("TPSERVE_FUSED_OPS", None)


if __name__ == "__main__":
    main()

"""The decode attention kernel against its source at another git revision, in one process.

    python -m benchmarks.paged_decode_ab [--base HEAD~1] [--repeats 9] [--layers 1]

Builds workers/csrc/paged_decode.cpp as it was at --base into a library of its own (op namespace
`tpserve_base`) beside the current build (`tpserve`), then times both on the same synthetic layer
step: 1, 16 and 64 sequences of 60-380 tokens over shuffled 16-token blocks, SmolLM2's heads (9
query heads over 3 KV heads, head dim 64), float32 and bfloat16. The two alternate call by call
batch, --repeats batches of 20; prints each side's median microseconds, their ratio, and the largest
difference between their outputs.

With --layers N the calls cycle over N caches of that shape, as a step cycles over its layers: at
30 (SmolLM2's layers; 0.6 GB at 64 sequences) each call reads its K/V from memory, not from the
last-level cache a single layer's 10 MB stays in.
"""
from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from workers.cpu_kernels import available, compile_library

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "workers/csrc/paged_decode.cpp"


def build_base(rev: str, folder: Path) -> None:
    text = subprocess.run(["git", "show", f"{rev}:{SOURCE}"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout
    for old in ("TORCH_LIBRARY_FRAGMENT(tpserve, m)", "TORCH_LIBRARY_IMPL(tpserve, CPU, m)"):
        if old not in text:
            raise SystemExit(f"{rev}:{SOURCE} does not register its op as this benchmark expects ({old})")
        text = text.replace(old, old.replace("tpserve", "tpserve_base"))
    src = folder / "paged_decode_base.cpp"
    src.write_text(text)
    listed = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:workers/csrc"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split()
    for header in (name for name in listed if name.endswith(".h")):  # what the source includes, as of rev
        (folder / header).write_text(subprocess.run(["git", "show", f"{rev}:workers/csrc/{header}"], cwd=ROOT,
                                                    check=True, capture_output=True, text=True).stdout)
    compile_library([src], folder / "base.so")
    torch.ops.load_library(str(folder / "base.so"))


def step_args(n: int, dtype: torch.dtype, rnd: random.Random, layers: int = 1) -> list[tuple]:
    """One layer step's arguments per layer: the same sequences, each layer its own K/V."""
    bs, d, kvh = 16, 64, 3
    lens = [rnd.randint(60, 380) for _ in range(n)]
    blocks = [-(-length // bs) for length in lens]
    free = list(range(sum(blocks)))
    rnd.shuffle(free)
    tables = torch.zeros(n, max(blocks), dtype=torch.long)
    for b, count in enumerate(blocks):
        tables[b, :count] = torch.tensor([free.pop() for _ in range(count)])
    q = torch.randn(n, 9, d).to(dtype)
    return [(q, torch.randn(sum(blocks), bs, kvh, d).to(dtype), torch.randn(sum(blocks), bs, kvh, d).to(dtype), tables,
             torch.tensor(lens), torch.arange(n), torch.arange(9) // 3, d ** -0.5, 0) for _ in range(layers)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD~1", help="the git revision whose kernel is the baseline")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--layers", type=int, default=1, help="caches the calls cycle over (30: from memory)")
    args = ap.parse_args()
    if not available():
        raise SystemExit("tpserve's CPU kernels are not available here")
    with tempfile.TemporaryDirectory() as tmp:
        build_base(args.base, Path(tmp))
    ops = {"base": torch.ops.tpserve_base.paged_decode, "current": torch.ops.tpserve.paged_decode}
    rnd = random.Random(0)
    print(f"`python -m benchmarks.paged_decode_ab --base {args.base} --layers {args.layers}`, "
          f"{torch.get_num_threads()} threads; median us per layer step\n")
    print("| dtype | sequences | base | current | current / base | max difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        for n in (1, 16, 64):
            steps = step_args(n, dtype, rnd, args.layers)
            outs = {name: torch.empty_like(steps[0][0]) for name in ops}
            times: dict[str, list[float]] = {name: [] for name in ops}
            for name, op in ops.items():
                op(*steps[0], outs[name])
            for _ in range(args.repeats):
                for name, op in ops.items():
                    t = time.perf_counter()
                    for i in range(20):
                        op(*steps[i % len(steps)], outs[name])
                    times[name].append((time.perf_counter() - t) / 20 * 1e6)
                    op(*steps[0], outs[name])  # the compared outputs: layer 0's
            base, cur = statistics.median(times["base"]), statistics.median(times["current"])
            diff = (outs["base"].float() - outs["current"].float()).abs().max().item()
            print(f"| {str(dtype).split('.')[1]} | {n} | {base:.1f} | {cur:.1f} | {cur / base:.2f}x | {diff:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()

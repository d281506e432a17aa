"""All-reduce, logits gather and plan broadcast latency between local ranks: shared memory
against gloo, interleaved, one run.

    python -m benchmarks.collectives [--tp 2] [--sizes 576,4608,147456] [--repeats 3]

576 floats is one SmolLM2 token's hidden state (a decode all-reduce at batch 1); 36,864 is
batch 64; 147,456 a 256-token prefill chunk. Prints median and p90 microseconds per op, as rank 0
sees them, with the spread of the medians over the repeats.
"""
from __future__ import annotations

import argparse
import statistics

from workers.comm_probe import measure_collectives


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--sizes", default="576,36864,147456")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    runs: dict[tuple[str, str, int], list] = {}
    for _ in range(args.repeats):
        for transport in ("shm", "gloo"):  # interleaved: drift hits both alike
            for t in measure_collectives(args.tp, sizes, args.iters, transport):
                runs.setdefault((t.op, t.transport, t.numel), []).append(t)
    print(f"tp {args.tp}, {args.iters} iterations x {args.repeats} repeats; microseconds as rank 0 sees them")
    print("| op | elements | transport | median us (min-max of repeats) | p90 us |")
    print("|---|---:|---|---:|---:|")
    for (op, transport, numel), ts in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        med = [t.median_us for t in ts]
        print(f"| {op} | {numel:,} | {transport} | {statistics.median(med):.1f} ({min(med):.1f}-{max(med):.1f}) "
              f"| {statistics.median(t.p90_us for t in ts):.1f} |")


if __name__ == "__main__":
    main()

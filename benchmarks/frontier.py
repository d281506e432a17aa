"""The latency/throughput frontier of SmolLM2 at tp 1 and tp 2 on this machine, in one plot.

    python -m benchmarks.frontier [--tps 1,2] [--sweep 1,4,16,64] [--out docs/frontier.png]

For each tp: `tpserve serve` (embedded Ray, one replica), then `tpserve bench --sweep` against it
(closed loop; random lengths, prompts 32-128 tokens, outputs 16-64; at most 64 requests and 40 s
of sending per point). Reports go to /tmp/frontier-tp<N>.json; the PNG holds both frontiers.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from cluster.bench.local_server import running_server


def sweep(tp: int, points: str, out: Path) -> None:
    with running_server("--tp", str(tp), "--kv-cache-memory", str(1 << 30)) as served:
        subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "--target", served.target,
                        "--sweep", points, "--num-requests", "64", "--duration", "40", "--warmup", "2",
                        "--input-range", "32,128", "--output-range", "16,64", "--name", f"tp {tp}",
                        "--out", str(out), "--no-progress"], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tps", default="1,2")
    ap.add_argument("--sweep", default="1,4,16,64")
    ap.add_argument("--out", default="docs/frontier.png")
    args = ap.parse_args()
    series = {}
    for tp in (int(t) for t in args.tps.split(",")):
        path = Path(f"/tmp/frontier-tp{tp}.json")
        sweep(tp, args.sweep, path)
        series[f"tp {tp}"] = json.loads(path.read_text())["runs"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cluster.bench.report import frontier

    fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
    frontier(ax, series)
    ax.set_title("SmolLM2-135M on 2 CPU cores: concurrency 1, 4, 16, 64")
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"{'tp':<5}{'load':<9}{'out tok/s':>10}{'req/s':>8}{'TTFT med':>10}{'TPOT med':>10}{'done':>6}")
    for name, runs in series.items():
        for r in runs:
            s = r["summary"]
            print(f"{name:<5}{r['load_label']:<9}{s['output_token_throughput']:>10.1f}{s['request_throughput']:>8.2f}"
                  f"{s['ttft']['median_ms']:>9.0f}ms{s['tpot']['median_ms']:>8.1f}ms{s['completed']:>6}")


if __name__ == "__main__":
    main()

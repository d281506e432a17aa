"""Summary table, JSON report, plot (TTFT and TPOT distributions; the latency/throughput frontier
for a sweep), and a figure-by-figure comparison of two reports."""
from __future__ import annotations

import json
from pathlib import Path

METRICS = ("ttft", "tpot", "itl", "e2e")


def print_summary(run: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    s = run["summary"]
    t = Table(title=f"{run['load_label']}: {s['completed']} completed, {s['failed']} failed "
                    f"{s['errors_by_status'] or ''} in {s['duration_s']:.1f}s")
    t.add_column("metric")
    for col in ("mean", "median", "p90", "p95", "p99"):
        t.add_column(f"{col} ms", justify="right")
    for m in METRICS:
        if s[m]:
            t.add_row(m.upper(), *(f"{s[m][k + '_ms']:.1f}" for k in ("mean", "median", "p90", "p95", "p99")))
    console.print(t)
    console.print(f"requests/s {s['request_throughput']:.2f}   output tok/s {s['output_token_throughput']:.1f}   "
                  f"total tok/s {s['total_token_throughput']:.1f}   goodput {s['goodput']:.2f} req/s "
                  f"({s['goodput_requests']} met SLOs {s['slo_ms']})")
    spec = s.get("speculative")
    if spec:
        console.print(f"speculative decoding: {spec['accepted_tokens']} of {spec['draft_tokens']} proposed tokens "
                      f"accepted ({spec['acceptance_rate']:.0%}), {spec['mean_accepted_length']:.2f} tokens per "
                      f"verifying step")


def save(report: dict, path: str) -> None:
    Path(path).write_text(json.dumps(report, indent=2))


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    ncols = 3 if len(runs) > 1 else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4), dpi=80)
    for run in runs:
        label = run["load_label"]
        recs = run["records"]
        axes[0].hist([r["ttft"] * 1e3 for r in recs if r["ok"] and r["ttft"] is not None], bins=30, alpha=0.5, label=label)
        axes[1].hist([r["tpot"] * 1e3 for r in recs if r["tpot"] is not None], bins=30, alpha=0.5, label=label)
    axes[0].set(title="TTFT distribution", xlabel="ms", ylabel="requests")
    axes[1].set(title="TPOT distribution", xlabel="ms per output token", ylabel="requests")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    if ncols == 3:
        frontier(axes[2], {report.get("name", "run"): runs})
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def frontier(ax, series: dict[str, list[dict]]) -> None:
    """Output tokens/s against median TPOT, one point per load, labelled by load."""
    for name, runs in series.items():
        pts = [(r["summary"]["tpot"]["median_ms"], r["summary"]["output_token_throughput"], r["load_label"])
               for r in runs if r["summary"]["tpot"]]
        if not pts:
            continue
        xs, ys, labels = zip(*pts)
        ax.plot(xs, ys, marker="o", label=name)
        for x, y, lab in pts:
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(title="latency / throughput frontier", xlabel="median TPOT (ms per token)", ylabel="output tokens/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def compare(a_path: str, b_path: str) -> list[str]:
    a, b = json.loads(Path(a_path).read_text()), json.loads(Path(b_path).read_text())
    lines = [f"{'load':<14}{'figure':<34}{'A':>12}{'B':>12}{'B/A':>8}"]
    for ra, rb in zip(a["runs"], b["runs"]):
        sa, sb = ra["summary"], rb["summary"]
        figs = [(k, sa[k], sb[k]) for k in ("request_throughput", "output_token_throughput", "total_token_throughput",
                                             "goodput", "failed")]
        for m in METRICS:
            if sa.get(m) and sb.get(m):
                figs += [(f"{m}.{q}", sa[m][q], sb[m][q]) for q in ("mean_ms", "median_ms", "p99_ms")]
        for name, x, y in figs:
            ratio = f"{y / x:.2f}" if x else "-"
            lines.append(f"{ra['load_label']:<14}{name:<34}{x:>12.2f}{y:>12.2f}{ratio:>8}")
    return lines

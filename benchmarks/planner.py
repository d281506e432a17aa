"""The planner checked against measurement on this machine, in one invocation.

    python -m benchmarks.planner [--tps 1,2] [--quantizations none,int8] [--concurrency 1,4,16,64]
                                 [--dtype float32] [--repeats 3] [--plot docs/planner.png] [--save run.json]
    python -m benchmarks.planner --replay run.json [--plot ...]

--repeats times:
1. `tpserve profile --repeats 1` (the same function; `--profile once` instead profiles once, with
   --repeats, before everything);
2. the tp x quantization configurations, in a rotated order each time: `tpserve serve` (one
   replica), then `tpserve bench` (the random workload, closed loop) at each concurrency;
3. `tpserve plan`'s prediction for each point from that repeat's profile alone (never from the
   measurements), on the bench's own request lengths (same generator, same seed; each repeat its
   own seed, so no repeat reuses another's prefix cache).
A point's prediction is the median over the repeats' predictions, its measurement the median over
the repeats' measurements. Profiling each repeat keeps calibration and measurement within ~20
minutes of each other: this machine's speed moves by 10-40% within the hour (the same step alone
measured 66-106 ms within one profile), and one profile an hour before the last bench carried
the difference into every prediction as bias.
Prints predicted against measured (median over repeats, min-max) for TPOT (median over requests),
output tokens/s and TTFT p90, the median absolute error of each, and the worst point; plots
predicted against measured. `--save` keeps the run's profiles and measurements; `--replay` prices
them again under today's cost model in seconds (a change to the model is then checked against a
run it was not fitted to before the next hour of measuring).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from workers import set_openmp_env

set_openmp_env()

from cluster.bench.local_server import running_server  # noqa: E402
from cluster.bench.main import main as bench_main  # noqa: E402
from cluster.planner.hardware import HardwareProfile  # noqa: E402
from cluster.planner.model_shape import ModelShape, load_config  # noqa: E402
from cluster.planner.plan import Planner, Workload, workload_lengths  # noqa: E402
from cluster.planner.profile import profile  # noqa: E402

INPUT_RANGE, OUTPUT_RANGE = (32, 256), (16, 64)
REQUESTS = {1: 6, 4: 12, 16: 32, 64: 64}
WARMUP = 2
FIGURES = (("tpot_ms", "TPOT p50 ms"), ("output_tok_s", "output tok/s"), ("ttft_ms_p90", "TTFT p90 ms"))


def measure(target: str, concurrency: int, n: int, seed: int, out: Path) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):  # the bench's own report tables: not this table
        bench_main(["--target", target, "--concurrency", str(concurrency), "--num-requests", str(n), "--warmup",
                    str(WARMUP), "--seed", str(seed), "--workload", "random", "--input-range",
                    ",".join(map(str, INPUT_RANGE)), "--output-range", ",".join(map(str, OUTPUT_RANGE)), "--out", str(out),
                    "--no-progress"])
    s = json.loads(out.read_text())["runs"][0]["summary"]
    return {"tpot_ms": s["tpot"]["median_ms"], "output_tok_s": s["output_token_throughput"],
            "ttft_ms_p90": s["ttft"]["p90_ms"]}


def measure_run(args) -> dict:
    """Profile and measure: {"args", "elapsed_s", "profiles": [HardwareProfile as a dict], "points":
    [{"tp", "quantization", "concurrency", "measured": {figure: [per repeat]}}]}, everything the
    predictions need (the workload's lengths come back from its seeds), so `--replay` can price the
    same run again under another cost model without the hour of measuring."""
    conc = [int(c) for c in args.concurrency.split(",")]
    t0 = time.perf_counter()
    hws = []  # the profile each repeat's predictions come from

    def new_profile(repeats: int) -> None:
        hws.append(profile(repeats, model=args.model, dtypes=("float32", args.dtype)))
        if args.hardware_out and len(hws) == 1:
            hws[0].save(args.hardware_out)
        print(f"profile: {hws[-1].source}; read {hws[-1].read_gbs:.1f} GB/s", flush=True)

    if args.profile == "once":
        new_profile(args.repeats)
    configs = [(q, int(tp)) for q in args.quantizations.split(",") for tp in args.tps.split(",")]
    got: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Repeats outermost, the configurations' order rotated each time: this machine's speed
        # drifts within the hour, and a configuration measured only in one stretch of it carried
        # that stretch's speed as a bias (the 2026-12-04 third run: every int8 point, measured in
        # the second half, pessimistic). Interleaved, drift shows as spread.
        for rep in range(args.repeats):
            if args.profile == "each-repeat":
                new_profile(1)
            for q, tp in configs[rep % len(configs):] + configs[:rep % len(configs)]:
                with running_server("--model", args.model, "--tp", str(tp), "--replicas", "1",
                                    "--quantization", q, "--dtype", args.dtype) as served:
                    for c in conc:
                        # A fresh seed per repeat: the same prompts again would hit the prefix cache.
                        got.setdefault((q, tp, c), []).append(
                            measure(served.target, c, REQUESTS.get(c, 2 * c), seed_of(rep, c),
                                    Path(tmp) / f"{q}-{tp}-{c}-{rep}.json"))
                print(f"  repeat {rep + 1}: tp {tp} {q} measured at {time.perf_counter() - t0:.0f} s", flush=True)
    points = [{"tp": tp, "quantization": q, "concurrency": c,
               "measured": {k: [g[k] for g in got[(q, tp, c)]] for k, _ in FIGURES}}
              for q, tp in configs for c in conc]
    return {"args": {k: getattr(args, k)
                     for k in ("model", "tps", "quantizations", "concurrency", "repeats", "profile", "dtype")},
            "elapsed_s": time.perf_counter() - t0, "profiles": [asdict(hw) for hw in hws], "points": points}


def seed_of(rep: int, concurrency: int) -> int:
    return 1000 * (rep + 1) + concurrency


def predict(run: dict) -> list[dict]:
    """Each point of `run` with "predicted": the median over the repeats of that repeat's profile's
    prediction (the one profile's, profiled once), on the repeat's own request lengths."""
    a = run["args"]
    hws = [HardwareProfile(**d) for d in run["profiles"]]
    model = ModelShape(load_config(a["model"]), a["model"])
    planners: dict[str, list] = {}
    rows = []
    for point in run["points"]:
        q, tp, c = point["quantization"], point["tp"], point["concurrency"]
        if q not in planners:
            planners[q] = [Planner(model, hw, q, a.get("dtype", "float32")) for hw in hws]
        n = REQUESTS.get(c, 2 * c)
        preds = []
        for rep in range(a["repeats"]):
            seed = seed_of(rep, c)
            lengths = workload_lengths("random", n + WARMUP, 128, 64, INPUT_RANGE, OUTPUT_RANGE, None, seed)[WARMUP:]
            planner = planners[q][rep if len(hws) > 1 else 0]
            preds.append(planner.evaluate(tp, 1, 64, Workload(lengths, concurrency=c, seed=seed), {}))
        rows.append({**point, "predicted": {k: statistics.median(getattr(p, k) for p in preds) for k, _ in FIGURES}})
    return rows


def report(run: dict, rows: list[dict], plot: str | None) -> None:
    a = run["args"]
    for row in rows:
        print(f"  tp {row['tp']} {row['quantization']} c {row['concurrency']}: " + ", ".join(
            f"{label} {row['predicted'][k]:.1f} pred / {statistics.median(row['measured'][k]):.1f} "
            f"meas" for k, label in FIGURES), flush=True)
    print(f"\n`python -m benchmarks.planner --repeats {a['repeats']} --profile {a['profile']} "
          f"--dtype {a.get('dtype', 'float32')}`, "
          f"{time.strftime('%Y-%m-%d')}, {run['elapsed_s']:.0f} s; profiles: "
          + "; ".join(hw["source"].split(', ', 1)[-1] for hw in run["profiles"])
          + f". Measured: median of {a['repeats']} (min-max).\n")
    print("| tp | quantization | concurrency | " + " | ".join(f"{label} pred / meas" for _, label in FIGURES) + " |")
    print("|---:|---|---:|" + "---:|" * len(FIGURES))
    errors: dict[str, list] = {k: [] for k, _ in FIGURES}
    for r in rows:
        cells = []
        for k, _ in FIGURES:
            m = r["measured"][k]
            med, p = statistics.median(m), r["predicted"][k]
            err = abs(p - med) / med
            errors[k].append((err, r))
            cells.append(f"{p:.1f} / {med:.1f} ({min(m):.1f}-{max(m):.1f}) {'+' if p >= med else '-'}{err:.0%}")
        print(f"| {r['tp']} | {r['quantization']} | {r['concurrency']} | " + " | ".join(cells) + " |")
    print()
    for k, label in FIGURES:
        errs = errors[k]
        worst = max(errs, key=lambda e: e[0])
        print(f"{label}: median absolute error {statistics.median(e for e, _ in errs):.1%}; worst {worst[0]:.0%} "
              f"at tp {worst[1]['tp']} {worst[1]['quantization']} concurrency {worst[1]['concurrency']}")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(FIGURES), figsize=(5 * len(FIGURES), 4.4))
        for ax, (k, label) in zip(axes, FIGURES):
            for r in rows:
                m = r["measured"][k]
                ax.errorbar(statistics.median(m), r["predicted"][k],
                            xerr=[[statistics.median(m) - min(m)], [max(m) - statistics.median(m)]],
                            fmt="o" if r["tp"] == 1 else "s", color="C0" if r["quantization"] == "none" else "C1",
                            ms=5, capsize=2)
                ax.annotate(str(r["concurrency"]), (statistics.median(m), r["predicted"][k]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
            lo = min(min(min(r["measured"][k]), r["predicted"][k]) for r in rows) * 0.8
            hi = max(max(max(r["measured"][k]), r["predicted"][k]) for r in rows) * 1.2
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            ax.set_xscale("log"); ax.set_yscale("log")
            ax.set_xlabel(f"measured {label}"); ax.set_ylabel(f"predicted {label}")
            ax.set_title(label)
        fig.suptitle("tpserve plan vs tpserve bench (circles tp 1, squares tp 2; blue none, orange int8; "
                     "labels: concurrency)", fontsize=9)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        print(f"wrote {plot}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tps", default="1,2")
    ap.add_argument("--quantizations", default="none,int8")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--dtype", default="float32", help="the served model's dtype (the profile measures it too)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--profile", choices=("each-repeat", "once"), default="each-repeat",
                    help="profile before each repeat (--repeats 1), or once before all (--repeats N)")
    ap.add_argument("--hardware-out", default=None, help="also save the (first) profile here")
    ap.add_argument("--save", default=None, help="write the run (profiles and measurements) here as JSON")
    ap.add_argument("--replay", default=None,
                    help="measure nothing: predict a run saved with --save again (its model, tps, repeats)")
    args = ap.parse_args()
    if args.replay:
        run = json.loads(Path(args.replay).read_text())
    else:
        run = measure_run(args)
        if args.save:
            Path(args.save).write_text(json.dumps(run, indent=1))
            print(f"wrote {args.save}")
    report(run, predict(run), args.plot)


if __name__ == "__main__":
    main()

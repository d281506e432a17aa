"""tpserve beside its peers on this CPU, one run, same requests: transformers, tpserve (each tp x
quantization, and bfloat16), and llama.cpp (the same GGUF) through llama-cpp-python.

    make bench-peers      # builds .venv-peers (llama-cpp-python 0.3.36, ~6 min once), then runs this
    python -m benchmarks.peers [--tps 1,2] [--quantizations none,int8,int4] [--repeats 3]
                               [--load-systems tp1-none,tp2-none] [--write docs/benchmarks.md]

Two figures per system, the systems interleaved within each repeat (drift hits all alike):
- batch-1 decode ms/token: a 12-token prompt, (t(64) - t(1)) / 63, greedy;
- 64 requests at once: benchmarks.throughput's decode-heavy mix (prompts 16-128, outputs 128-256,
  seed 0, exact lengths, EOS ignored), output tokens/s. transformers runs them one at a time on
  the first --serial-requests (a rate); llama.cpp runs them as 64 sequences of one batch (its
  low-level batch API, kv_unified off); tpserve runs the --load-systems settings.
Also: llama.cpp's Q4_1 perplexity on benchmarks.quality's text (same windows, same token ids), and
the read-bandwidth floor of the fp32 step (weights' bytes / a 512 MiB reduction's GB/s).
Reported: the median over repeats and the min-max spread; the targets of issue 12 as ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from workers import set_openmp_env  # noqa: E402
set_openmp_env()

import torch  # noqa: E402

from benchmarks.decode import PROMPT, bench_transformers, per_token_ms, read_bandwidth_gbs  # noqa: E402
from benchmarks.quality import TEXT  # noqa: E402
from benchmarks.throughput import engine_run, hf_serial, make_requests  # noqa: E402
from workers.engine.core import EngineConfig  # noqa: E402
from workers.engine.sampling_params import SamplingParams  # noqa: E402
from workers.launcher import start_worker_group, threads_per_rank  # noqa: E402
from workers.model_source import builtin_gguf, resolve_model  # noqa: E402
from workers.worker import WorkerSpec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PEERS_PY = ROOT / ".venv-peers" / "bin" / "python"
DRIVER = Path(__file__).resolve().parent / "llama_cpp_driver.py"
MARK_BEGIN, MARK_END = "<!-- benchmarks.peers:begin -->", "<!-- benchmarks.peers:end -->"


def llama_cpp(gguf: Path, job: dict) -> dict:
    out = subprocess.run([str(PEERS_PY), str(DRIVER), str(gguf)], input=json.dumps(job), capture_output=True,
                         text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"llama.cpp driver failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def tpserve_decode(group, ids: list[int], n: int) -> float:
    def run(k):
        group.engine.generate([ids], SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True))

    run(4)
    return per_token_ms(run, n, 1)


def spread(xs: list[float], fmt: str = "{:.1f}") -> str:
    med = statistics.median(xs)
    return fmt.format(med) if len(xs) == 1 else f"{fmt.format(med)} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tps", default="1,2")
    ap.add_argument("--quantizations", default="none,int8,int4")
    ap.add_argument("--bf16", default="1,2", help="tp degrees that also run in bfloat16 (unquantized)")
    ap.add_argument("--load-systems", default="tp1-none,tp2-none,tp1-bf16,tp2-bf16",
                    help="tpserve settings that run the 64 requests (tpN-quantization)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--serial-requests", type=int, default=4)
    ap.add_argument("--write", default=None, help="replace the marked block of this markdown file with the table")
    args = ap.parse_args()
    if not PEERS_PY.exists():
        raise SystemExit(f"{PEERS_PY} is missing: run `make bench-peers` (it builds llama-cpp-python once)")
    gguf = builtin_gguf(args.model)
    folder = resolve_model(args.model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok(PROMPT).input_ids
    vocab = len(tok)
    reqs = make_requests("decode", args.num_requests, vocab)
    text_ids = tok(TEXT.read_text()).input_ids
    tps = [int(t) for t in args.tps.split(",")]
    quants = args.quantizations.split(",")
    settings = [(tp, q) for q in quants for tp in tps] + [(int(t), "bf16") for t in args.bf16.split(",") if t]
    load = set(args.load_systems.split(","))
    gbs = read_bandwidth_gbs()
    print(f"model {args.model} ({gguf.name}), {os.cpu_count()} cores, torch {torch.__version__}, "
          f"read bandwidth {gbs:.1f} GB/s; {args.repeats} repeats, interleaved", flush=True)

    b1: dict[str, list[float]] = {}
    tput: dict[str, list[float]] = {}
    weights: dict[str, int] = {}
    version = ""
    for rep in range(args.repeats):
        b1.setdefault("transformers", []).append(bench_transformers(folder, ids, args.new_tokens, 1))
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads_per_rank(1))
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        n, t = hf_serial(hf, reqs[:args.serial_requests])
        tput.setdefault("transformers", []).append(n / t)
        del hf
        for tp, q in settings:
            name = f"tp{tp}-{q}"
            spec = WorkerSpec(str(folder), tp_size=tp, quantization="none" if q == "bf16" else q,
                              dtype="bfloat16" if q == "bf16" else "float32", kv_cache_memory=1 << 30)
            cfg = EngineConfig(max_num_seqs=args.num_requests, max_num_batched_tokens=1024)
            with start_worker_group(spec, cfg) as group:
                b1.setdefault(name, []).append(tpserve_decode(group, ids, args.new_tokens))
                weights[name] = max(r["param_bytes"] for r in group.reports)
                if name in load:
                    engine_run(group, make_requests("decode", 4, vocab, seed=99))  # warm-up
                    n, t = engine_run(group, reqs)
                    tput.setdefault(name, []).append(n / t)
            print(f"  repeat {rep + 1}: {name} {b1[name][-1]:.1f} ms/token"
                  + (f", {tput[name][-1]:.1f} tok/s" if name in load else ""), flush=True)
        r = llama_cpp(gguf, {"op": "decode", "prompt": ids, "new_tokens": args.new_tokens, "repeats": 1})
        b1.setdefault("llama.cpp", []).append(r["ms_per_token"])
        r = llama_cpp(gguf, {"op": "batch", "requests": [[q.prompt, q.out_len] for q in reqs]})
        tput.setdefault("llama.cpp", []).append(r["output_tokens"] / r["seconds"])
        version = r["llama_cpp_python"]
        print(f"  repeat {rep + 1}: transformers {b1['transformers'][-1]:.1f} ms/token, "
              f"{tput['transformers'][-1]:.1f} tok/s; llama.cpp {b1['llama.cpp'][-1]:.1f} ms/token, "
              f"{tput['llama.cpp'][-1]:.1f} tok/s", flush=True)
    ppl = llama_cpp(gguf, {"op": "perplexity", "tokens": text_ids, "window": 512, "stride": 256})["perplexity"]

    lines = [f"`python -m benchmarks.peers --repeats {args.repeats}`, {time.strftime('%Y-%m-%d')}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}, llama-cpp-python {version} (GGML_NATIVE, "
             f"2 threads), read bandwidth {gbs:.1f} GB/s. Median of {args.repeats} (min-max). "
             f"64 requests: {sum(len(q.prompt) for q in reqs):,} prompt and {sum(q.out_len for q in reqs):,} "
             f"output tokens; transformers runs the first {args.serial_requests} one at a time.", "",
             "| system | batch-1 ms/token | vs llama.cpp | x read floor | 64 requests, output tok/s |",
             "|---|---:|---:|---:|---:|"]
    ref = statistics.median(b1["llama.cpp"])
    for name in ["transformers"] + [f"tp{tp}-{q}" for tp, q in settings] + ["llama.cpp"]:
        ms = statistics.median(b1[name])
        floor = f"{ms / (weights[name] / gbs / 1e6):.2f}x" if name in weights else "-"
        label = {"transformers": "transformers `generate` fp32", "llama.cpp": "llama.cpp Q4_1 (same GGUF)"}.get(
            name, f"tpserve {name.replace('-', ' ').replace('none', 'fp32').replace('bf16', 'bf16 weights')}")
        lines.append(f"| {label} | {spread(b1[name])} | {ms / ref:.2f}x | {floor} | "
                     f"{spread(tput[name]) if name in tput else '-'} |")
    best = max((n for n in tput if n.startswith("tp")), key=lambda n: statistics.median(tput[n]))
    med = {n: statistics.median(v) for n, v in b1.items()}
    tmed = {n: statistics.median(v) for n, v in tput.items()}
    lines += ["", "| target (issue 12) | measured | met |", "|---|---:|:---:|"]

    def target(text: str, value: float, ok: bool, fmt: str = "{:.2f}x") -> None:
        lines.append(f"| {text} | {fmt.format(value)} | {'yes' if ok else 'no'} |")

    for q, bound in (("int4", 1.5), ("int8", 2.5)):
        if f"tp1-{q}" in med:
            target(f"batch-1 {q} (tp 1) <= {bound}x llama.cpp", med[f"tp1-{q}"] / ref, med[f"tp1-{q}"] / ref <= bound)
    if "tp1-none" in med:
        x = med["tp1-none"] / (weights["tp1-none"] / gbs / 1e6)
        target("batch-1 fp32 (tp 1) <= 1.5x its read floor", x, x <= 1.5)
    target(f"64 requests, best ({best}) >= 2x llama.cpp", tmed[best] / tmed["llama.cpp"],
           tmed[best] / tmed["llama.cpp"] >= 2)
    target(f"64 requests, best ({best}) >= 15x transformers one at a time", tmed[best] / tmed["transformers"],
           tmed[best] / tmed["transformers"] >= 15)
    if "tp1-none" in med and "tp2-none" in med:
        x = med["tp2-none"] / med["tp1-none"]
        target("batch-1 tp 2 / tp 1 <= 1.2x", x, x <= 1.2)
    if "tp1-none" in tmed and "tp2-none" in tmed:
        x = tmed["tp2-none"] / tmed["tp1-none"]
        target("64 requests tp 2 / tp 1 >= 0.9x", x, x >= 0.9)
    lines += ["", f"llama.cpp Q4_1 perplexity on `benchmarks/data/keeping_time.txt` ({len(text_ids):,} tokens, "
                  f"windows 512, stride 256, as `benchmarks.quality`): {ppl:.3f}"]
    table = "\n".join(lines)
    print("\n" + table)
    if args.write:
        path = Path(args.write)
        doc = path.read_text()
        if MARK_BEGIN not in doc:
            raise SystemExit(f"{path} has no {MARK_BEGIN} ... {MARK_END} block to replace")
        head, rest = doc.split(MARK_BEGIN, 1)
        tail = rest.split(MARK_END, 1)[1]
        path.write_text(f"{head}{MARK_BEGIN}\n{table}\n{MARK_END}{tail}")
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())

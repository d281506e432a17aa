"""Offline throughput: transformers one at a time, transformers in padded batches of 16, and the
tpserve engine with every request at once, on the same requests, in one run.

    python -m benchmarks.throughput [--model smollm2-135m] [--mix decode|long|both] [--tp 1]

64 requests, lengths drawn with seed 0; every system emits exactly each request's output length
(min_new_tokens / ignore_eos). Mixes: decode-heavy (prompts 16-128, outputs 128-256) and long
(prompts 16-512, outputs 16-256). Output tokens/s counts only each request's own tokens: in a
padded batch, tokens past a request's length are waste, which is the cost of static batching.

The one-at-a-time baseline is a rate, so it runs on the first --serial-requests (default 8) of
the 64 to keep the run short; the padded batches and the engine run all 64. Also printed: the
engine's fraction of the fp32 matmul peak, a profile of its steps (attention, matmuls, collectives,
sampling, the rest), and the batch-1 decode step against the time to read the weights once at the
machine's copy bandwidth, each ceiling measured in this run.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

from workers import set_openmp_env  # noqa: E402
set_openmp_env()

import torch  # noqa: E402

from workers.engine.core import EngineConfig  # noqa: E402
from workers.engine.sampling_params import SamplingParams  # noqa: E402
from workers.launcher import start_worker_group, threads_per_rank  # noqa: E402
from workers.model_source import resolve_model  # noqa: E402
from workers.worker import WorkerSpec  # noqa: E402

MIXES = {"decode": ((16, 128), (128, 256)), "long": ((16, 512), (16, 256))}


@dataclass(slots=True)
class Req:
    prompt: list[int]
    out_len: int


def make_requests(mix: str, n: int, vocab: int, seed: int = 0) -> list[Req]:
    (plo, phi), (olo, ohi) = MIXES[mix]
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(n):
        p = int(torch.randint(plo, phi + 1, (1,), generator=g))
        o = int(torch.randint(olo, ohi + 1, (1,), generator=g))
        reqs.append(Req(torch.randint(100, vocab - 100, (p,), generator=g).tolist(), o))
    return reqs


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def copy_bandwidth_gbs(nbytes: int = 1 << 29, reps: int = 5) -> float:
    src = torch.empty(nbytes // 4)
    dst = torch.empty_like(src)
    src.fill_(1.0); dst.copy_(src)
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    return 2 * nbytes * reps / (time.perf_counter() - t) / 1e9  # read + write


def hf_serial(model, reqs: list[Req]) -> tuple[int, float]:
    t = time.perf_counter()
    for r in reqs:
        with torch.no_grad():
            model.generate(torch.tensor([r.prompt]), max_new_tokens=r.out_len, min_new_tokens=r.out_len,
                           do_sample=False, pad_token_id=0)
    return sum(r.out_len for r in reqs), time.perf_counter() - t


def hf_padded(model, reqs: list[Req], batch: int = 16) -> tuple[int, float]:
    t = time.perf_counter()
    for i in range(0, len(reqs), batch):
        chunk = reqs[i:i + batch]
        width = max(len(r.prompt) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(chunk):  # left padding, as generate expects for decoder-only models
            ids[j, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[j, width - len(r.prompt):] = 1
        n = max(r.out_len for r in chunk)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
    return sum(r.out_len for r in reqs), time.perf_counter() - t


def engine_run(group, reqs: list[Req]) -> tuple[int, float]:
    params = [SamplingParams(max_tokens=r.out_len, temperature=0.0, ignore_eos=True) for r in reqs]
    t = time.perf_counter()
    done = group.engine.generate([r.prompt for r in reqs], params)
    elapsed = time.perf_counter() - t
    assert all(len(c.token_ids) == r.out_len for c, r in zip(done, reqs))
    return sum(r.out_len for r in reqs), elapsed


def flops(cfg, reqs: list[Req]) -> float:
    """Matmul FLOPs the engine must do: 2 x weights per computed token, attention, LM head per sample."""
    h, i, L, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_layers"], cfg["head_dim"]
    nh, nkv, v = cfg["num_heads"], cfg["num_kv_heads"], cfg["vocab_size"]
    per_token = 2 * L * (h * (nh + 2 * nkv) * d + nh * d * h + 3 * h * i)
    total = 0.0
    for r in reqs:
        n = len(r.prompt) + r.out_len
        total += per_token * n + 2 * v * h * r.out_len
        total += L * 4 * nh * d * (n * (n + 1) / 2)  # q.k and p.v over the causal context
    return total


def profile_engine(folder, reqs: list[Req], batched_tokens: int) -> dict[str, float]:
    """Share of wall time by category: an EngineCore stepped on this thread under the profiler
    (the serving engine runs on its own thread, which the profiler does not follow)."""
    from torch.profiler import ProfilerActivity, profile

    from workers.engine.core import EngineCore
    from workers.engine.executor import WorkerExecutor
    from workers.worker import Worker

    worker = Worker(WorkerSpec(str(folder), kv_cache_memory=3 << 30), 0)
    engine = EngineCore(WorkerExecutor(worker), None, EngineConfig(max_num_seqs=len(reqs), max_num_batched_tokens=batched_tokens))
    for i, r in enumerate(reqs):
        engine.add_request(str(i), r.prompt, SamplingParams(max_tokens=r.out_len, temperature=0.0, ignore_eos=True))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        while engine.has_work():
            engine.step()
        wall = time.perf_counter() - t
    events = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages()}
    parts = {"attention": events.get("tpserve.attention", 0.0),
             "matmuls (linear layers)": events.get("aten::linear", 0.0),
             "collectives": events.get("tpserve.all_reduce", 0.0),
             "sampling": events.get("tpserve.sample", 0.0)}
    parts["rest (python, norms, rope, scheduling)"] = wall - sum(parts.values())
    return {k: v / wall for k, v in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--mix", default="both", choices=["decode", "long", "both"])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--serial-requests", type=int, default=8)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    folder = resolve_model(args.model)
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads_per_rank(1))
    print(f"model {args.model}, float32, {os.cpu_count()} cores, torch {torch.__version__}, engine tp {args.tp}")
    peak = matmul_peak_gflops()
    bw = copy_bandwidth_gbs()
    print(f"measured ceilings: fp32 matmul {peak:.1f} GFLOP/s (2048^3), copy bandwidth {bw:.1f} GB/s (read+write)")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    spec = WorkerSpec(str(folder), tp_size=args.tp, kv_cache_memory=3 << 30)
    cfg = EngineConfig(max_num_seqs=args.num_requests, max_num_batched_tokens=args.max_num_batched_tokens)
    with start_worker_group(spec, cfg) as group:
        info = group.engine.call("info")
        engine_run(group, make_requests("decode", 4, info["config"]["vocab_size"], seed=99))  # warm-up
        for mix in (["decode", "long"] if args.mix == "both" else [args.mix]):
            reqs = make_requests(mix, args.num_requests, info["config"]["vocab_size"])
            serial = hf_serial(model, reqs[:args.serial_requests])
            padded = hf_padded(model, reqs)
            ours = engine_run(group, reqs)
            rate = {name: n / t for name, (n, t) in
                    {"serial": serial, "padded": padded, "engine": ours}.items()}
            frac = flops(info["config"], reqs) / ours[1] / 1e9 / peak
            out_tokens = sum(r.out_len for r in reqs)
            print(f"\n== {mix} mix: {len(reqs)} requests, {sum(len(r.prompt) for r in reqs)} prompt tokens, "
                  f"{out_tokens} output tokens ==")
            print(f"{'system':<44}{'output tok/s':>13}{'vs serial':>11}{'vs padded':>11}")
            for name, label in (("serial", f"transformers, one at a time ({args.serial_requests} req)"),
                                ("padded", "transformers, padded batches of 16"),
                                ("engine", f"tpserve engine, all {len(reqs)} at once")):
                print(f"{label:<44}{rate[name]:>13.1f}{rate[name] / rate['serial']:>10.2f}x"
                      f"{rate[name] / rate['padded']:>10.2f}x")
            print(f"engine: {frac:.1%} of the fp32 matmul peak")
            if not args.no_profile:
                prof = profile_engine(folder, reqs, args.max_num_batched_tokens)
                print("engine profile (tp 1, under the profiler): " + ", ".join(f"{k} {v:.0%}" for k, v in prof.items()))
        # Batch-1 decode step against the physical limit: reading every weight once.
        weights = sum(r["param_bytes"] for r in group.reports) / args.tp
        one = make_requests("decode", 1, info["config"]["vocab_size"], seed=7)[0]
        p1 = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        p65 = SamplingParams(max_tokens=65, temperature=0.0, ignore_eos=True)
        t = time.perf_counter(); group.engine.generate([one.prompt], p1); t1 = time.perf_counter() - t
        t = time.perf_counter(); group.engine.generate([one.prompt], p65); t65 = time.perf_counter() - t
        step = (t65 - t1) / 64
        floor = weights / (bw / 2 * 1e9)  # read-only: half the copy's read+write traffic per byte moved
        print(f"\nbatch-1 decode step {step * 1e3:.1f} ms; reading {weights / 2**20:.0f} MiB of weights at "
              f"{bw / 2:.1f} GB/s takes {floor * 1e3:.1f} ms: the step is {step / floor:.1f}x the memory-bound floor")


if __name__ == "__main__":
    main()

"""Correctness and timing check on an NVIDIA GPU (one card is enough). No weights travel:
a seeded random Llama-family model is built on the spot.

    python scripts/gpu_check.py            # on the GPU machine (scripts/gpu_check.sh wraps it)
    python scripts/gpu_check.py --device cpu --small   # a dry run anywhere (the test suite does this)

Checks: tp 1 on the device against transformers (exact greedy tokens in float32 with TF32 off,
a logit tolerance in bfloat16); an NCCL process group initialised and an all-reduce on the card;
tp 2 on the same device through gloo (host-staged collectives); the engine's batch invariance
(exact tokens in float32, logprobs within a tolerance in bfloat16). NCCL across several GPUs
cannot be checked on one GPU. Then timings of the engine on a 1B-class Llama (random weights,
bfloat16): decode ms/step at batch 1, 8 and 64 with the achieved fraction of memory bandwidth,
and prefill tokens/s with the fraction of the bf16 matmul peak, both ceilings measured in this
run. Also int8 and int4 weights on the device against the CPU kernels on the same quantized
checkpoint (logits within 1e-3, greedy tokens equal), with their decode ms/token; n-gram speculative
decoding on the device (greedy tokens equal to decoding without it). Exits non-zero if a check fails.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers import set_openmp_env  # noqa: E402
set_openmp_env()

import torch  # noqa: E402

from workers.engine.core import EngineConfig  # noqa: E402
from workers.engine.sampling_params import SamplingParams  # noqa: E402
from workers.launcher import free_port, start_worker_group  # noqa: E402
from workers.worker import WorkerSpec  # noqa: E402

FAILURES: list[str] = []
# KV-cache bytes per group: explicit, because by default a CUDA rank takes most of the free memory
# and two ranks share this one card.
KV = 1 << 30


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"[{'PASS' if ok else 'FAIL'}] {name} {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def check_against_reference(label: str, spec, prompt: list[int], n: int, dev: str, ref_logits: torch.Tensor,
                            tol: float, ref_tokens: list[int] | None, also: torch.Tensor | None = None,
                            ref_name: str = "transformers") -> float:
    """Start a group for `spec`; its logits must be within `tol` of the reference, its greedy tokens
    equal (when given). Returns its decode ms/token. `also`: a second reference, only reported."""
    with start_worker_group(spec) as grp:
        logits = grp.call("prefill_logits", [prompt]).cpu()
        rel = rel_err(logits, ref_logits)
        detail = f"(rel err {rel:.2e}" + (f"; vs fp32 {rel_err(logits, also):.2e})" if also is not None else ")")
        suffix = " bf16" if spec.dtype == "bfloat16" else ""
        check(f"{label} logits vs {ref_name}{suffix}", rel < tol, detail)
        if ref_tokens is not None:
            check(f"{label} greedy {n} tokens == {ref_name}", greedy(grp, prompt, n) == ref_tokens)
        return decode_ms(lambda k: greedy(grp, prompt, k), n, dev)


def build_model(folder: Path, small: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if small:
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                          initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    else:  # a ~0.5B Llama shape, GQA 4:1
        cfg = LlamaConfig(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
                          num_attention_heads=12, num_key_value_heads=3, max_position_embeddings=2048,
                          initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)


def hf_reference(folder: Path, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()


def hf_greedy(model, prompt: list[int], n: int, device: str) -> tuple[list[int], float]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=n, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                             eos_token_id=model.config.vocab_size)
    gaps = [(lambda t: (t[0] - t[1]).item())(s[0].float().topk(2).values) for s in out.logits]
    return out.sequences[0, len(prompt):].tolist(), min(gaps)


def greedy(group, prompt: list[int], n: int) -> list[int]:
    return group.engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0].token_ids


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def decode_ms(run, n: int, device: str) -> float:
    run(4)
    sync(device); t = time.perf_counter(); run(1); sync(device); t1 = time.perf_counter() - t
    sync(device); t = time.perf_counter(); run(n); sync(device); tn = time.perf_counter() - t
    return (tn - t1) / (n - 1) * 1e3


def nccl_check() -> None:
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    x = torch.full((1024,), 3.0, device="cuda")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    check("nccl: process group + all_reduce on the card (1 rank)", bool((x == 3.0).all()),
          f"nccl {'.'.join(map(str, torch.cuda.nccl.version()))}")
    dist.destroy_process_group()


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab - 1, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def check_batch_invariance(folder: Path, dev: str, dtype: str, n_tokens: int) -> None:
    prompts = make_prompts(16, 8, 200, 500, seed=5)
    params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    spec = WorkerSpec(str(folder), device=dev, dtype=dtype, kv_cache_memory=KV)
    with start_worker_group(spec) as grp:
        alone = [grp.engine.generate([p], params)[0] for p in prompts]
        together = grp.engine.generate(prompts, params)
    if dtype == "float32":
        same = [a.token_ids == t.token_ids for a, t in zip(alone, together)]
        check("engine fp32: 16 requests alone == together (exact tokens)", all(same), f"({sum(same)}/16)")
    else:
        diffs = [abs(x["logprob"] - y["logprob"]) for a, t in zip(alone, together)
                 for x, y in zip(a.logprobs, t.logprobs) if x["token_id"] == y["token_id"]]
        worst = max(diffs)
        check("engine bf16: logprobs alone vs together within 0.1", worst < 0.1, f"(max diff {worst:.3f})")


def check_speculative(folder: Path, dev: str, dtype: str, n_tokens: int) -> None:
    """n-gram speculative decoding on the device: the same greedy tokens as without it, K+1-row
    verify chunks actually run (some proposals accepted)."""
    from workers.engine.speculative import SpeculativeConfig

    g = torch.Generator().manual_seed(7)
    prompts = []
    for _ in range(8):  # a phrase said three times: something for the lookup to find
        phrase = torch.randint(3, 499, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        prompts.append(phrase * 3 + torch.randint(3, 499, (5,), generator=g).tolist())
    params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
    spec = WorkerSpec(str(folder), device=dev, dtype=dtype, kv_cache_memory=KV)
    with start_worker_group(spec) as grp:
        want = [c.token_ids for c in grp.engine.generate(prompts, params)]
    ngram = SpeculativeConfig("ngram", 4, prompt_lookup_max=3, prompt_lookup_min=1, max_batch=64)
    with start_worker_group(spec, EngineConfig(speculative=ngram)) as grp:
        got = [c.token_ids for c in grp.engine.generate(prompts, params)]
        st = grp.engine.call("stats")
    if dtype == "float32":
        same = sum(a == b for a, b in zip(got, want))
        check("speculative ngram float32: greedy tokens equal to no speculation", same == len(want),
              f"({same}/{len(want)}; {st.spec_accepted_tokens}/{st.spec_draft_tokens} proposals accepted)")
    check(f"speculative ngram {dtype}: verify steps ran and accepted proposals", st.spec_accepted_tokens > 0,
          f"({st.spec_drafts} verify steps, {st.spec_accepted_tokens} accepted)")


def build_1b(folder: Path, small: bool, dev: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if small:
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    else:  # TinyLlama-1.1B's shape
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                          num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)


def engine_timings(folder: Path, dev: str, small: bool) -> list[tuple[str, str]]:
    """Decode ms/step at batch 1/8/64 and prefill tokens/s, against ceilings measured here."""
    rows = []
    n = 8 if small else 64
    if dev == "cuda":
        x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        y.copy_(x); torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            y.copy_(x)
        torch.cuda.synchronize()
        bw = 2 * x.numel() * 10 / (time.perf_counter() - t)  # bytes read + written per second
        del x, y
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        a @ a; torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        peak = 2 * 8192 ** 3 * 10 / (time.perf_counter() - t)
        del a
    else:
        bw, peak = 10e9, 100e9  # placeholders for the dry run
    rows.append(("copy bandwidth (measured)", f"{bw / 1e9:.0f} GB/s"))
    rows.append(("bf16 matmul peak (measured, 8192^3)", f"{peak / 1e12:.0f} TFLOP/s"))
    spec = WorkerSpec(str(folder), device=dev, dtype="bfloat16", kv_cache_memory=(1 << 30) if small else (16 << 30))
    with start_worker_group(spec, EngineConfig(max_num_seqs=64, max_num_batched_tokens=8192)) as grp:
        info = grp.engine.call("info")
        weight_bytes = grp.reports[0]["param_bytes"]
        cfg = info["config"]
        kv_per_token = 2 * cfg["num_layers"] * cfg["num_kv_heads"] * cfg["head_dim"] * 2
        vocab = cfg["vocab_size"]
        for batch in (1, 8, 64):
            prompts = make_prompts(batch, 128, 129, vocab, seed=batch)
            run = lambda k: grp.engine.generate(prompts, SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True))
            ms = decode_ms(run, n, dev)
            step_bytes = weight_bytes + batch * kv_per_token * (128 + n // 2)
            frac = step_bytes / (ms / 1e3) / (bw / 2)  # reads per step over the read bandwidth
            rows.append((f"decode batch {batch}", f"{ms:.2f} ms/step, {frac:.0%} of memory bandwidth"))
        prompts = make_prompts(8, 512, 513, vocab, seed=9)
        one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        grp.engine.generate(prompts[:1], one)
        sync(dev); t = time.perf_counter()
        grp.engine.generate(prompts, one)
        sync(dev); el = time.perf_counter() - t
        toks = sum(map(len, prompts))
        frac = 2 * (weight_bytes / 2) * toks / el / peak
        rows.append(("prefill 8 x 512 tokens", f"{toks / el:,.0f} tokens/s, {frac:.0%} of bf16 matmul peak"))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="a tiny model (dry runs)")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    dev, n = args.device, args.new_tokens
    if dev == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device visible"); return 2
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, cuda {torch.version.cuda}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    timings: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t = time.perf_counter(); build_model(folder, args.small)
        print(f"built seeded random model in {time.perf_counter() - t:.1f}s")
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, 500, (24,), generator=g).tolist()

        # ---- float32, TF32 off: exact greedy tokens ------------------------------------------
        ref32 = hf_reference(folder, dev, torch.float32)
        ref_tokens, gap = hf_greedy(ref32, prompt, n, dev)
        check("reference margin: top-2 gap > 1e-3 at every position", gap > 1e-3, f"(min gap {gap:.2e})")
        with torch.no_grad():
            ref_logits = ref32(torch.tensor([prompt], device=dev)).logits[0].float().cpu()
        timings.append(("transformers generate fp32", decode_ms(
            lambda k: hf_greedy(ref32, prompt, k, dev), n, dev)))
        timings.append(("tpserve tp1 fp32", check_against_reference(
            "tp1 fp32", WorkerSpec(str(folder), tp_size=1, device=dev, dtype="float32", kv_cache_memory=KV),
            prompt, n, dev, ref_logits, 1e-4, ref_tokens)))
        del ref32

        # ---- bfloat16: a logit tolerance -------------------------------------------------------
        ref16 = hf_reference(folder, dev, torch.bfloat16)
        with torch.no_grad():
            ref16_logits = ref16(torch.tensor([prompt], device=dev)).logits[0].float().cpu()
        timings.append(("transformers generate bf16", decode_ms(lambda k: hf_greedy(ref16, prompt, k, dev), n, dev)))
        del ref16
        timings.append(("tpserve tp1 bf16", check_against_reference(
            "tp1 bf16", WorkerSpec(str(folder), tp_size=1, device=dev, dtype="bfloat16", kv_cache_memory=KV),
            prompt, n, dev, ref16_logits, 5e-2, None, also=ref_logits)))

        # ---- NCCL on the card ------------------------------------------------------------------
        if dev == "cuda":
            nccl_check()

        # ---- tp 2 on one device through gloo ---------------------------------------------------
        spec = WorkerSpec(str(folder), tp_size=2, device=dev, dtype="float32", backend="gloo", kv_cache_memory=KV)
        timings.append(("tpserve tp2 fp32 via gloo (host-staged)", check_against_reference(
            "tp2 (gloo, one device) fp32", spec, prompt, n, dev, ref_logits, 1e-4, ref_tokens)))

        # ---- weight-only quantization on the device: the CPU kernels' numbers ----------------------
        for q in ("int8", "int4"):
            cpu = WorkerSpec(str(folder), tp_size=1, device="cpu", dtype="float32", quantization=q, kv_cache_memory=KV)
            with start_worker_group(cpu) as grp:
                q_logits = grp.call("prefill_logits", [prompt]).cpu()
                q_tokens = greedy(grp, prompt, n)
            spec = WorkerSpec(str(folder), tp_size=1, device=dev, dtype="float32", quantization=q, kv_cache_memory=KV)
            timings.append((f"tpserve tp1 {q} (fp32 activations)", check_against_reference(
                f"tp1 {q} on {dev}", spec, prompt, n, dev, q_logits, 1e-3, q_tokens, ref_name="the cpu kernels")))

        # ---- the engine: batch invariance ------------------------------------------------------
        check_batch_invariance(folder, dev, "float32", 16)
        check_batch_invariance(folder, dev, "bfloat16", 16)

        # ---- speculative decoding: K+1-row verify chunks on the device -------------------------
        check_speculative(folder, dev, "float32", 24)
        check_speculative(folder, dev, "bfloat16", 24)

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter(); build_1b(Path(tmp), args.small, dev)
        print(f"built 1B-class model in {time.perf_counter() - t:.1f}s")
        engine_rows = engine_timings(Path(tmp), dev, args.small)

    print(f"\n{'decode, batch 1':<44}{'ms/token':>10}")
    for name, ms in timings:
        print(f"{name:<44}{ms:>10.2f}")
    print(f"\n{'engine, 1B-class Llama, bf16':<44}")
    for name, value in engine_rows:
        print(f"{name:<44}{value}")
    print(f"\n{len(FAILURES)} failed" + (f": {', '.join(FAILURES)}" if FAILURES else ""))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())

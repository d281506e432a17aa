"""`tpserve profile`: measure this machine for the planner (2-core VM, 2026-12-06: 123 s at --repeats 1, both dtypes).

    tpserve profile --out hw.json [--repeats 3] [--dtypes float32,bfloat16]

What it measures (each figure the median of --repeats, its min-max kept in `spread`):
- read bandwidth: a sum over a 512 MiB tensor;
- matmuls: seconds per weight element at 1-256 rows, for none/int8/w8a8/int4, in a float32 and
  a bfloat16 model (`--dtypes`: their layers run different kernels; unquantized at one row bf16
  took 0.45x float32's time per weight on 2026-12-06) and for each thread count a rank can have
  here (cores // tp), through the engine's own layers and the kernels their probe picks on this
  machine (workers/layers/linear_method.py);
- attention over the paged KV cache (the engine's PagedAttentionBatch, on the decode path the
  engine chooses here): the per-layer call, per KV byte read by decode, FLOP/s of a prefill chunk;
- collectives between real local ranks joined as a replica joins them (workers.comm_probe):
  all-reduce and logits gather by size, the plan broadcast, for tp 2..cores;
- fixed costs: a tiny random Llama (hidden 64, SmolLM2's 49,152-entry vocabulary) run by the
  engine core at 2 and 8 layers and at 1 and 16 sequences: per step, per layer, per sampled row;
- the served path: `--model` (SmolLM2 by default) served by `tpserve serve` (one replica, the
  smallest tp, each dtype) and streamed by `tpserve bench` from this host: its decode step at one sequence,
  with the frontend's streaming, the Ray poll, detokenizing and the client on the same cores,
  and the model's worker groups (each tp and dtype; unquantized, int8 and int4) stepped alone at 1, 4, 16 and 64
  sequences (sampled once per repeat, so the median spans the profile's run) and through one
  256-token prefill (twice per repeat, a minute apart, the faster kept). Prompts are synthetic.
Nothing here reads a benchmark result: the planner is calibrated from this file alone.
"""
from __future__ import annotations

import itertools
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from cluster.planner.hardware import HardwareProfile
from workers.comm_probe import measure_collectives
from workers.defaults import BLOCK_SIZE

ROWS = (1, 2, 4, 8, 16, 64, 256)
QUANTS = ("none", "int8", "w8a8", "int4")
DTYPES = ("float32", "bfloat16")  # model dtypes measured by default (CPU: float16 has no fast kernels here)
COLLECTIVE_SIZES = (576, 4608, 36864, 147456, 589824)


def _best(fn, passes: int = 3) -> float:
    fn()
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def read_bandwidth_gbs() -> float:
    """A 512 MiB float32 sum's GB/s, in 2 MiB pages where the engine holds its weights in them
    (workers/huge_pages.py: a sum in 4 KiB pages read 0.66-0.87x as fast)."""
    from workers import huge_pages

    if huge_pages.available() is None:
        x = huge_pages.huge_page_bytes(512 << 20).view(torch.float32)
    else:
        x = torch.empty(128 << 20)
    x.fill_(1)
    return x.numel() * 4 / _best(x.sum) / 1e9


def _weights(quant: str, shapes, copies: int, probe, dtype: torch.dtype = torch.float32):
    """Column-parallel layers of a `dtype` model holding random weights in each format, loaded and
    finished as the engine finishes its own (the kernel the probe picks on this machine is the one
    timed)."""
    from workers.layers.linear import ColumnParallelLinear
    from workers.parallel import TPGroup
    from workers.quantization import QuantConfig, quantize_int4, quantize_int8
    from workers.tensor_source import TensorSource

    out = []
    for _ in range(copies):
        for n, k in shapes:
            w = torch.randn(n, k) * 0.02
            if quant == "none":
                held = {"weight": w}
            elif quant in ("int8", "w8a8"):  # w8a8 holds int8's codes
                codes, scale = quantize_int8(w)
                held = {"weight": codes, "weight_scale": scale}
            else:
                codes, sz = quantize_int4(w, 32)
                held = {"weight": codes, "weight_sz": sz}
            layer = ColumnParallelLinear(k, n, False, TPGroup(0, 1), dtype, quant=QuantConfig(quant, 32))
            for name, value in held.items():
                p = getattr(layer, name)
                p.weight_loader(p, TensorSource.wrap(name, value))
            layer.finish_loading(probe)
            out.append(layer)
    return out


SHAPES = [(1536, 576), (576, 1536), (960, 576), (576, 576)]  # a SmolLM2-sized layer's projections
COPIES = 12  # 32 M weights (128 MiB in fp32): far past the caches, as a model's weights are
_LAYERS: dict[tuple[str, str], list] = {}


def linear_table(quant: str, dtype: str = "float32") -> dict[str, float]:
    """Seconds per weight element at each row count in a `dtype` model (its activations in that
    dtype), streaming 32 M weights (not cache-resident: a smaller set measured a third faster than
    the engine's real decode step)."""
    from workers.huge_pages import place_weights
    from workers.kernel_probe import KernelProbe

    tdtype = getattr(torch, dtype)
    if (quant, dtype) not in _LAYERS:  # built once per profile, reused by every repeat and thread count
        _LAYERS[(quant, dtype)] = _weights(quant, SHAPES, copies=COPIES, probe=KernelProbe.for_this_machine(),
                                           dtype=tdtype)
        place_weights(torch.nn.ModuleList(_LAYERS[(quant, dtype)]))  # in 2 MiB pages, as a rank's weights are
    layers = _LAYERS[(quant, dtype)]
    elements = sum(n * k for n, k in SHAPES) * COPIES
    table = {}
    for rows in ROWS:
        xs = {576: torch.randn(rows, 576, dtype=tdtype), 1536: torch.randn(rows, 1536, dtype=tdtype)}

        def run():
            # Each layer's input width from SHAPES (`_weights`' order): an int4 layer keeps no
            # `weight` once its decode kernel's copy is packed.
            for layer, (_, k) in zip(layers, SHAPES * COPIES):
                layer(xs[k])

        table[str(rows)] = _best(run, passes=1 if rows >= 64 else 3) / elements
    return table


def attention_figures() -> tuple[float, float, float]:
    """(call s, s per KV byte, prefill FLOP/s) for one layer of SmolLM2's shape (3 KV heads, 9 q heads)."""
    from workers.kv_cache import HeadLayout
    from workers.paged_cache import PagedKVCache, PagedSeq

    from workers.kernel_probe import KernelProbe
    from workers.paged_decode_op import gather_up_to

    kvh, heads, d, bs = 3, 9, 64, 16
    kv_of = [h // 3 for h in range(heads)]
    cache = PagedKVCache(1, 2048, bs, kvh, d, torch.float32, "cpu")
    # The decode path the engine takes on this machine (in place or gathered: its start-up choice).
    cache.gather_up_to = gather_up_to(KernelProbe.for_this_machine(), kvh, kv_of, d, bs, torch.float32)
    layout = HeadLayout.build(kv_of, kvh)

    def decode(batch: int, ctx: int) -> float:
        nb = -(-ctx // bs)
        seqs = [PagedSeq(ctx - 1, 1, list(range(i * nb, (i + 1) * nb))) for i in range(batch)]
        q, k = torch.randn(batch, heads, d), torch.randn(batch, kvh, d)
        attn = cache.batch(seqs)
        return _best(lambda: [attn.attend(0, q, k, k, layout, 0.125) for _ in range(20)]) / 20

    small, large = decode(1, 16), decode(16, 1024)
    kv_bytes = 16 * 1024 * 2 * kvh * d * 4
    per_byte = max(0.0, (large - small) / kv_bytes)
    n = 256
    attn = cache.batch([PagedSeq(0, n, list(range(n // bs)))])
    q, k = torch.randn(n, heads, d), torch.randn(n, kvh, d)
    t = _best(lambda: attn.attend(0, q, k, k, layout, 0.125)) - small
    flops = 4 * heads * d * n * (n + 1) / 2
    return small, per_byte, flops / max(t, 1e-6)


TINY_VOCAB, TINY_HIDDEN = 49152, 64


def fixed_costs(threads: int, lm_head_s) -> tuple[float, float, float]:
    """(per step, per layer, per sampled row per 1,000 vocab entries) through the engine core.
    `lm_head_s(rows)`: the tiny model's LM head matmul at that many rows, priced by the linear
    table and taken out (the planner prices every model's LM head with that table)."""
    from workers.engine.core import EngineConfig, EngineCore
    from workers.engine.executor import WorkerExecutor
    from workers.engine.sampling_params import SamplingParams
    from workers.worker import Worker, WorkerSpec

    torch.set_num_threads(threads)
    vocab = TINY_VOCAB
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layers in (2, 8):
            folder = os.path.join(tmp, f"l{layers}")
            _tiny_model(folder, layers)
            worker = Worker(WorkerSpec(folder, num_threads=threads, kv_cache_memory=64 << 20), 0)
            core = EngineCore(WorkerExecutor(worker), None, EngineConfig(max_num_seqs=16))
            ids = iter(range(10**9))

            def steps(batch: int, tokens: int) -> float:
                for _ in range(batch):
                    core.add_request(f"r{next(ids)}", list(range(5, 21)),
                                     SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
                core.step()  # the prefill
                t, n = time.perf_counter(), 0
                while core.has_work():
                    core.step()
                    n += 1
                return (time.perf_counter() - t) / n

            steps(1, 4)
            timings[(layers, 1)] = min(steps(1, 33) for _ in range(2))
            if layers == 2:
                timings[(layers, 16)] = min(steps(16, 17) for _ in range(2))
    layer = max(0.0, (timings[(8, 1)] - timings[(2, 1)]) / 6)
    step = max(0.0, timings[(2, 1)] - 2 * layer - lm_head_s(1))
    per_row = max(0.0, (timings[(2, 16)] - lm_head_s(16) - timings[(2, 1)] + lm_head_s(1)) / 15) / (vocab / 1000)
    return step, layer, per_row


def _tiny_model(folder: str, layers: int) -> None:
    """The fixed-cost model: a tiny random Llama with SmolLM2's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    cfg = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()  # its "Writing model shards" bar, four times per repeat
    try:
        LlamaForCausalLM(cfg).save_pretrained(folder)
    finally:
        hf_logging.enable_progress_bar()


# Served at one sequence only, over SERVED_REQUESTS requests one after the other: what serving
# adds per step was measured at 16 sequences too until 2026-12-05, and there it was a difference of
# two single ~300 ms samples (served minus alone) on a machine whose steps move 15% a second apart.
# Six profiles that day measured +16.3, -25.1, +65.6, +32.9, +56.2 and -54.5 ms at 16 (mean +15,
# standard deviation 47) against +18.6, +6.6, +20.9, +19.5, +22.7 and +15.2 at one (mean +17,
# deviation 6): the same added time per step within noise, and the 16-sequence point contributed
# only its noise to every prediction at 16 and more sequences.
SERVED_CONCURRENCY = (1,)
SERVED_REQUESTS = 3  # the TPOT median over three single-sequence requests (the bench's time of the 16's)
ALONE_CONCURRENCY = (1, 4, 16, 64)  # alone: timed from the token arrivals after the last prefill
SERVED_TOKENS = 16  # decode steps timed per served request
# Tokens per sample alone (the steps after the first token are timed), sampled once per repeat:
# more where a step is cheap, since one 8-step sample at one sequence (0.8 s here) moved by 15%
# between samples a second apart.
ALONE_TOKENS = {1: 25, 4: 17, 16: 9, 64: 9}
# One block and a token: the copies of the steps alone share the prompt's first block from the
# prefix cache (warmed at the group's start) and prefill one token each. With a 16-token prompt
# nothing was shareable, and 64 copies prefilled 1,024 tokens in two chunks: 43 of the profile's
# 66 s alone per repeat, and the first chunk's 32 sequences finished a step early, so the last
# timed step at "64" decoded 32 (measured 436-480 ms against 474-554 ms for 64 in every step).
SERVED_PROMPT = BLOCK_SIZE + 1  # tokens: the timed steps decode at contexts 18-33
PROMPT = list(range(100, 100 + SERVED_PROMPT))  # the steps alone; the served bench sends its own of this length
SERVED_CONTEXT = SERVED_PROMPT + SERVED_TOKENS // 2 + 1  # their mean, as the planner prices them
# int4 is measured on its own since its decode GEMV is tpserve's (workers/csrc/int4_gemv.cpp), not
# int8's kernel family: taking int8's scale, its bf16 points were 15-27% optimistic at 1-16
# sequences (2026-12-06). w8a8 takes int8's.
ALONE_QUANTS = ("none", "int8", "int4")
# A prefill step alone, per group: the decode steps' scale at 64 tokens priced every longer step,
# prefill chunks included, and tp 2 int8's TTFT p90 came out +22..+26% in one validation and
# -9..-18% in the one before (docs/planner.md) with its decode steps within 12%. The top of the
# validation's prompt lengths (32-256), so its TTFT p90 is a step near this one.
PREFILL_TOKENS = 256


def decode_step(engine, prompt: list[int], sequences: int, tokens: int) -> float:
    """Seconds per decode step of `sequences` copies of `prompt` batched together, from the token
    arrivals of the last one admitted: its first token comes after every prompt's prefill (at 64
    sequences the prefill takes two chunks), so the steps after it decode only. One pass, no
    second prefill-only run to subtract."""
    from workers.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    streams = [engine.add_request(prompt, params) for _ in range(sequences)]
    arrivals = [time.perf_counter() for out in streams[-1] for _ in out.new_token_ids]  # as they come
    for s in streams[:-1]:
        s.result()
    return (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)


def prefill_step(engine, first: int) -> float:
    """Seconds from submitting a PREFILL_TOKENS-token prompt, nothing of it cached (`first`, its
    first token, differs between calls), to its first token: one prefill step, the request's
    hand-off to rank 0 and back included (a millisecond here)."""
    from workers.engine.sampling_params import SamplingParams

    prompt = [first] + list(range(1000, 1000 + PREFILL_TOKENS - 1))
    t = time.perf_counter()
    stream = engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    arrivals = [time.perf_counter() for out in stream if out.new_token_ids]  # one: max_tokens=1
    return arrivals[0] - t


class AloneSteps:
    """`model`'s worker groups, one per tp x quantization, open through the profile's repeats so
    that each decode step alone is sampled once per repeat, spread over the whole profile: this
    machine's speed drifts by ~10% within minutes, and a single sample of a step carried that
    drift into every prediction of its configuration (the 2026-12-04 validation: every tp 2 and
    int8 point pessimistic by 12-34%). Each group has its own processes even at tp 1, as a served
    replica's ranks are (this process runs the matmul tables and holds their weights).

    Per quantization, because a quantized step is not the unquantized step's price times the same
    ratio: its kernels change at the probe's row cut-over (int8 in bf16 up to it,
    dequantize-and-multiply past it); at 4 and 64 sequences too, so the scale is neither
    interpolated across 1-16 nor held flat past 16."""

    def __init__(self, model: str, tps: list[int], quants: tuple[str, ...] = ALONE_QUANTS,
                 dtypes: tuple[str, ...] = ("float32",)):
        import contextlib

        from workers.launcher import LocalWorkerGroup
        from workers.worker import WorkerSpec

        self._stack = contextlib.ExitStack()
        self.groups = {}
        # Started together: a group's start is mostly its processes importing torch and loading
        # the model, one at a time 24 s for the four groups here.
        keys = [(tp, d, q) for tp in tps for d in dtypes for q in quants]
        with ThreadPoolExecutor(len(keys)) as pool:
            futures = [pool.submit(LocalWorkerGroup, WorkerSpec(model, tp_size=tp, dtype=d, quantization=q))
                       for tp, d, q in keys]
        error = None
        for key, fut in zip(keys, futures):
            try:
                self.groups[key] = self._stack.enter_context(fut.result())
            except BaseException as e:
                error = error or e
        try:
            if error is not None:
                raise error
            for g in self.groups.values():
                decode_step(g.engine, PROMPT, 2, 2)  # warm, and PROMPT's first block into the prefix cache
        except BaseException:
            self._stack.close()
            raise
        self.samples: dict[tuple[int, str, int], list[float]] = {}
        self.prefill_samples: dict[tuple[int, str], list[list[float]]] = {}  # per repeat, its samples
        self._prompts = itertools.count(3000)  # each prefill sample's first token: no prefix hit

    def sample(self, turn: int = 0) -> None:
        """One sample of every group's step at each sequence count: sequence counts outermost, the
        groups' order reversed on odd turns. What the planner takes from these is mostly each
        group's step against the others' (int8 against unquantized, tp 2 against tp 1); run group
        by group, one group's four counts took ~20 s, and the same step sampled in two such blocks
        measured int8/unquantized 0.65-0.95 at one sequence (2026-12-04), the machine's speed
        moving between them. Samples of one count a second apart see the same machine."""
        order = list(self.groups.items())
        if turn % 2:
            order.reverse()
        for c in ALONE_CONCURRENCY:
            for key, g in order:
                self.samples.setdefault((*key, c), []).append(decode_step(g.engine, PROMPT, c, ALONE_TOKENS[c]))
        for key, g in order:
            self.prefill_samples.setdefault(key, []).append([prefill_step(g.engine, next(self._prompts))])

    def sample_prefill_again(self, turn: int = 0) -> None:
        """Each group's prefill a second time in this repeat, a minute after `sample`'s (the
        repeat's other figures between them), in the other order; the repeat keeps the faster of
        the two, as the profile's kernel timings keep their best pass (`_best`). One prefill step
        runs 1-3 s at full compute on both cores, and single samples of it ranged 1,286-2,582 ms
        across the 2026-12-05 (seventh) validation's three profiles while the benches' TTFT at
        one sequence stayed at 1.4-2.0 s: the prefill's price set every TTFT p90 past one
        sequence (+24..+74% at 4 and 16 sequences). Replayed on that run's profiles, the least of
        the three samples instead of each profile's own took TTFT p90 from 20.9% to 13.0%."""
        order = list(self.groups.items())
        if turn % 2 == 0:
            order.reverse()
        for key, g in order:
            self.prefill_samples[key][-1].append(prefill_step(g.engine, next(self._prompts)))

    def medians(self) -> dict[int, dict[str, dict[str, dict[str, float]]]]:
        """tp -> dtype -> quantization -> {str(sequences): seconds}"""
        out: dict = {}
        for (tp, d, q, c), v in self.samples.items():
            out.setdefault(tp, {}).setdefault(d, {}).setdefault(q, {})[str(c)] = statistics.median(v)
        return out

    def prefill_medians(self) -> dict[int, dict[str, dict[str, dict[str, float]]]]:
        """tp -> dtype -> quantization -> {str(PREFILL_TOKENS): seconds}: the median over repeats
        of each repeat's faster sample"""
        out: dict = {}
        for (tp, d, q), v in self.prefill_samples.items():
            out.setdefault(tp, {}).setdefault(d, {}).setdefault(q, {})[str(PREFILL_TOKENS)] = \
                statistics.median(min(r) for r in v)
        return out

    def spread(self) -> dict[str, list[float]]:
        out = {f"alone tp {tp} {d} {q} {c}": [min(v), max(v)] for (tp, d, q, c), v in self.samples.items()}
        out.update({f"alone prefill tp {tp} {d} {q} {PREFILL_TOKENS}": [min(map(min, v)), max(map(max, v))]
                    for (tp, d, q), v in self.prefill_samples.items()})
        return out

    def close(self) -> None:
        self._stack.close()


def served_path(model: str, alone: dict[int, dict[str, dict[str, dict[str, float]]]],
                prefill: dict[int, dict[str, dict[str, dict[str, float]]]],
                progress=print) -> dict[str, dict[str, dict]]:
    """str(tp) -> {"alone": {str(sequences): s}, "alone_by_quantization": {q: {str(sequences): s}},
    "prefill": {q: {str(tokens): s}}, "dtypes": {dtype: {"alone_by_quantization", "prefill",
    "served"}}, "served": {str(sequences): s}}: `alone` (AloneSteps.medians: float32's in the
    first three, "alone" the unquantized one; the other dtypes' under "dtypes"), `prefill`
    (AloneSteps.prefill_medians) and, at the smallest tp only, `model` served unquantized in each
    dtype by `tpserve serve` (one replica) and streamed by `tpserve bench` from this host at
    SERVED_CONCURRENCY, decode steps at context SERVED_CONTEXT. One tp served
    (hardware.served_points): a server start costs seconds.

    What serving adds is measured on the model's own shapes, because it is not the frontend's CPU
    time alone: while a step's OpenMP threads hold every core, each wake-up of the frontend, the Ray
    poll or the client stalls a thread the others wait for, so the added time grows with the step
    (a tiny model's 3 ms steps measured a tenth of it)."""
    import contextlib
    import io
    import json

    from cluster.bench.local_server import running_server
    from cluster.bench.main import main as bench_main

    out = {str(tp): {"alone": by_d["float32"]["none"], "served": {},
                     "alone_by_quantization": {q: v for q, v in by_d["float32"].items() if q != "none"},
                     "prefill": prefill.get(tp, {}).get("float32", {}),
                     "dtypes": {d: {"alone_by_quantization": by_q, "prefill": prefill.get(tp, {}).get(d, {})}
                                for d, by_q in by_d.items() if d != "float32"}}
           for tp, by_d in alone.items()}
    tp = min(alone)
    for d in alone[tp]:  # float32 first (the dict's order), each dtype its own server
        t0 = time.perf_counter()
        served = out[str(tp)]["served"] if d == "float32" else out[str(tp)]["dtypes"][d].setdefault("served", {})
        with tempfile.TemporaryDirectory() as tmp, running_server("--model", model, "--tp", str(tp), "--replicas", "1",
                                                                  "--dtype", d) as srv:
            for c in SERVED_CONCURRENCY:  # the first bench's warm-up request warms the server for all
                report = os.path.join(tmp, f"bench-{tp}-{c}.json")
                with contextlib.redirect_stdout(io.StringIO()):  # its report table is not ours to print
                    bench_main(["--target", srv.target, "--concurrency", str(c), "--num-requests",
                                str(c * SERVED_REQUESTS), "--warmup", "1" if c == SERVED_CONCURRENCY[0] else "0",
                                "--workload", "fixed", "--input-len", str(len(PROMPT)), "--output-len",
                                str(SERVED_TOKENS + 1), "--out", report, "--no-progress"])
                with open(report) as f:
                    served[str(c)] = json.load(f)["runs"][0]["summary"]["tpot"]["median_ms"] / 1e3
        none = alone[tp][d]["none"]
        progress(f"  served path at tp {tp} {d} ({time.perf_counter() - t0:.0f} s): " + ", ".join(
            f"{c} sequences {(served[c] - none[c]) * 1e3:+.1f} ms per step ({none[c] * 1e3:.1f} alone, "
            f"{served[c] * 1e3:.1f} served)" for c in served))
    for t, by_d in sorted(alone.items()):
        for d, by_q in by_d.items():
            progress(f"  step alone at tp {t} {d}, ms at {', '.join(map(str, ALONE_CONCURRENCY))} sequences: "
                     + "; ".join(f"{q} " + " / ".join(f"{v * 1e3:.1f}" for v in a.values()) for q, a in by_q.items())
                     + f"; a {PREFILL_TOKENS}-token prefill " + ", ".join(
                         f"{q} {v[str(PREFILL_TOKENS)] * 1e3:.1f}" for q, v in prefill.get(t, {}).get(d, {}).items()))
    return out


def profile(repeats: int = 3, progress=print, model: str | None = "smollm2-135m",
            dtypes: tuple[str, ...] = DTYPES) -> HardwareProfile:
    """`model`: what the served path is measured with (a folder or a name `tpserve serve` takes;
    None: not measured, the planner then prices no served path). `dtypes`: the model dtypes
    whose matmuls and steps alone are measured (float32, the CPU default and the served path's,
    always is)."""
    dtypes = ("float32", *(d for d in dict.fromkeys(dtypes) if d != "float32"))
    from workers import set_openmp_env
    from workers.launcher import threads_per_rank

    set_openmp_env()
    cores = os.cpu_count() or 1
    thread_counts = sorted({threads_per_rank(tp) for tp in range(1, cores + 1)})
    samples: dict[str, list] = {}

    def keep(key, value):
        samples.setdefault(key, []).append(value)

    t0 = time.perf_counter()
    alone = None
    if model is not None:
        from workers.model_source import resolve_model

        folder = str(resolve_model(model))
        alone = AloneSteps(folder, sorted({1, min(2, cores)}), dtypes=dtypes)
        progress(f"  worker groups for the steps alone started at {time.perf_counter() - t0:.0f} s")
    for rep in range(repeats):
        if alone is not None:
            alone.sample(rep)
        for threads in thread_counts:
            torch.set_num_threads(threads)
            if threads == max(thread_counts):
                keep("read_gbs", read_bandwidth_gbs())
            tables = {}
            for d in dtypes:
                for q in QUANTS:
                    tables[(d, q)] = linear_table(q, d)
                    for rows, s in tables[(d, q)].items():
                        keep(("linear", d, q, threads, rows), s)
            call, per_byte, flops = attention_figures()
            keep(("attn_call", threads), call)
            keep(("attn_byte", threads), per_byte)
            keep(("attn_flops", threads), flops)
            from cluster.planner.hardware import interp

            head = tables[("float32", "none")]  # the tiny model's LM head, float32 as it runs
            step, layer, row = fixed_costs(threads, lambda r: TINY_VOCAB * TINY_HIDDEN * interp(head, r))
            keep(("step", threads), step)
            keep(("layer", threads), layer)
            keep("row", row)
        for tp in range(2, cores + 1):
            for t in measure_collectives(tp, list(COLLECTIVE_SIZES), iters=100):
                keep(("coll", t.op, tp, t.numel), t.median_us)
        if alone is not None:
            alone.sample_prefill_again(rep)
        progress(f"  repeat {rep + 1}/{repeats} done at {time.perf_counter() - t0:.0f} s")
    # Served once, not per repeat: a server start costs seconds, and the figure is a difference of
    # two medians over many tokens already.
    served = {}
    if alone is not None:
        medians, prefills, alone_spread = alone.medians(), alone.prefill_medians(), alone.spread()
        alone.close()
        served = served_path(folder, medians, prefills, progress)

    med = {k: statistics.median(v) for k, v in samples.items()}
    linear: dict = {}
    coll: dict = {}
    for k, v in med.items():
        if isinstance(k, tuple) and k[0] == "linear":
            linear.setdefault(k[1], {}).setdefault(k[2], {}).setdefault(str(k[3]), {})[k[4]] = v
        if isinstance(k, tuple) and k[0] == "coll":
            coll.setdefault(k[1], {}).setdefault(str(k[2]), {})[str(k[3])] = v
    spread = {str(k): [min(v), max(v)] for k, v in samples.items() if len(v) > 1}
    if alone is not None:
        spread.update(alone_spread)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return HardwareProfile(
        name=f"{platform.node() or 'this machine'} ({cores} cores)",
        source=f"measured: tpserve profile, {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
               f"{repeats} repeats in {time.perf_counter() - t0:.0f} s",
        device="cpu", devices_per_node=cores, memory_bytes=mem, read_gbs=med["read_gbs"],
        linear_s=linear,
        attn_call_s={str(t): med[("attn_call", t)] for t in thread_counts},
        attn_kv_s_per_byte={str(t): med[("attn_byte", t)] for t in thread_counts},
        attn_prefill_flops={str(t): med[("attn_flops", t)] for t in thread_counts},
        collectives=coll, step_s={str(t): med[("step", t)] for t in thread_counts},
        layer_s={str(t): med[("layer", t)] for t in thread_counts}, seq_s_per_kvocab=med["row"], served_s=served,
        served_model=model or "", served_context=SERVED_CONTEXT if served else 0, spread=spread)

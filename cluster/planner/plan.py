"""`tpserve plan`: predicted TTFT, TPOT and throughput for every tp x replicas x max_num_seqs that
fits, and the cheapest one meeting the SLO.

Each candidate is checked for memory (weights, the KV cache its max_num_seqs needs at the
workload's longest context, a step's activations), then simulated: the engine's own scheduler
and block manager per replica (cluster/simulator.py), the router's least-load choice between
replicas, each step priced by RooflineCost from the hardware profile. TPOT and TTFT are those
of docs/bench.md (per request; TPOT = (E2E - TTFT) / (output tokens - 1)). The SLO holds when
TTFT p90 <= ttft and TPOT p90 <= tpot. Cheapest: fewest devices (tp x replicas); ties go to the
higher predicted throughput.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from cluster.bench.workload import WorkloadSpec, make_workload
from cluster.planner.cost import RooflineCost
from cluster.planner.hardware import HardwareProfile
from cluster.planner.model_shape import ModelShape
from cluster.modelled_executor import ReplicaModel, StepShape
from cluster.simulator import SimRequest, simulate
from workers.defaults import (BLOCK_SIZE, CPU_KV_CACHE_BYTES, GPU_MEMORY_UTILIZATION, MAX_NUM_BATCHED_TOKENS,
                              default_dtype)
from workers.engine.block_keys import BlockKeyer, new_salt
from workers.errors import ConfigError
from workers.paged_cache import PagedKVCache

CPU_MEMORY_SHARE = 0.8  # of the node's RAM, for all its ranks together


@dataclass
class Workload:
    lengths: list[tuple[int, int]]  # (prompt tokens, output tokens) per request
    rate: float | None = None  # open loop, requests/s (Poisson)
    concurrency: int | None = None  # closed loop
    seed: int = 0

    @property
    def max_context(self) -> int:
        return max(i + o for i, o in self.lengths)


@dataclass
class Candidate:
    tp: int
    replicas: int
    max_num_seqs: int
    devices: int
    fits: bool
    why: str = ""
    ttft_ms_p50: float | None = None
    ttft_ms_p90: float | None = None
    tpot_ms: float | None = None  # median over requests
    tpot_ms_p90: float | None = None
    output_tok_s: float | None = None
    slo_ok: bool | None = None
    memory_gib: float = 0.0  # per device
    parts_ms: dict = field(default_factory=dict)  # a decode step at max_num_seqs, by term


def parse_slo(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    slo = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip().lower()
        if key not in ("ttft", "tpot") or not value:
            raise ConfigError("slo", f"{part!r}: use ttft=MS,tpot=MS")
        try:
            slo[key] = float(value)
        except ValueError:
            raise ConfigError("slo", f"{part!r}: {value!r} is not a number of milliseconds") from None
        if slo[key] <= 0:
            raise ConfigError("slo", f"{key} must be > 0 ms")
    return slo


def workload_lengths(kind: str, n: int, input_len: int, output_len: int, input_range, output_range,
                     file: str | None, seed: int, tokenizer=None) -> list[tuple[int, int]]:
    """The lengths `tpserve bench` would send for the same options (its own generator)."""
    spec = WorkloadSpec(kind=kind, input_len=input_len, output_len=output_len, input_range=input_range,
                        output_range=output_range, file=file)
    try:
        reqs = make_workload(spec, n, vocab=50_000, seed=seed)
    except ValueError as e:
        raise ConfigError("workload", str(e)) from None
    out = []
    for r in reqs:
        if r.prompt_ids is not None:
            n_in = len(r.prompt_ids)
        elif tokenizer is not None:
            n_in = len(tokenizer(r.prompt_text).input_ids)
        else:
            n_in = math.ceil(1.3 * len(r.prompt_text.split()))  # ~1.3 tokens per English word
        out.append((max(1, n_in), max(1, r.output_len)))
    return out


class Planner:
    def __init__(self, model: ModelShape, hw: HardwareProfile, quantization: str = "none", dtype: str | None = None,
                 max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS, kv_cache_memory: int | None = None):
        self.model, self.hw, self.quantization = model, hw, quantization
        self.dtype = dtype or default_dtype(hw.device)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv_cache_memory = kv_cache_memory

    # ---- memory -------------------------------------------------------------------------------
    def memory(self, tp: int, replicas: int, max_num_seqs: int, max_context: int) -> tuple[bool, str, int, float]:
        """(fits, why not, KV blocks per replica, GiB per device). Blocks 0: weights and
        activations do not fit at all, or the KV cache cannot hold one request; blocks > 0 with fits False: the KV cache holds fewer than
        max_num_seqs sequences of the longest context (the engine would queue or preempt)."""
        m, hw = self.model, self.hw
        if max_context > m.cfg.max_position_embeddings:
            return False, f"context {max_context} exceeds the model's {m.cfg.max_position_embeddings}", 0, 0.0
        weights = m.weight_bytes(tp, self.quantization, self.dtype, hw.device)
        acts = m.activation_bytes(self.max_num_batched_tokens, tp, self.dtype)
        per_block = PagedKVCache.bytes_per_block(m.cfg.num_layers, BLOCK_SIZE, m.rank(tp).kv_heads, m.cfg.head_dim,
                                                 _torch_dtype(self.dtype))
        need_blocks = max_num_seqs * -(-max_context // BLOCK_SIZE)
        if hw.device == "cpu":
            kv_budget = self.kv_cache_memory or CPU_KV_CACHE_BYTES
            blocks = kv_budget // per_block
            ranks = tp * replicas
            total = ranks * (weights + acts + blocks * per_block)
            per_device = total / ranks
            if total > CPU_MEMORY_SHARE * hw.memory_bytes:
                return False, (f"{ranks} ranks need {total / 2**30:.1f} GiB; the node has "
                               f"{hw.memory_bytes / 2**30:.0f} GiB"), 0, per_device / 2**30
        else:
            usable = hw.memory_bytes * GPU_MEMORY_UTILIZATION
            left = usable - weights - acts
            if left <= 0:
                return False, (f"weights {weights / 2**30:.1f} GiB + activations {acts / 2**30:.1f} GiB per GPU "
                               f"exceed {usable / 2**30:.1f} GiB"), 0, (weights + acts) / 2**30
            blocks = int((self.kv_cache_memory or left) // per_block)
            per_device = weights + acts + blocks * per_block
        one = -(-max_context // BLOCK_SIZE)
        if blocks < one:  # not even one request of the workload's longest context: nothing to simulate
            return False, (f"the KV cache holds {blocks} blocks of {BLOCK_SIZE} tokens; one request of "
                           f"{max_context} tokens needs {one}"), 0, per_device / 2**30
        if blocks < need_blocks:
            return False, (f"{max_num_seqs} sequences of {max_context} tokens need {need_blocks} KV blocks; "
                           f"{blocks} fit"), blocks, per_device / 2**30
        return True, "", blocks, per_device / 2**30

    # ---- one candidate -------------------------------------------------------------------------
    def evaluate(self, tp: int, replicas: int, max_num_seqs: int, work: Workload, slo: dict) -> Candidate:
        cand = Candidate(tp, replicas, max_num_seqs, tp * replicas, True)
        fits, why, blocks, gib = self.memory(tp, replicas, max_num_seqs, work.max_context)
        cand.memory_gib = gib
        if not fits:
            cand.fits, cand.why = False, why
            if blocks == 0:
                return cand  # nothing to simulate: the weights do not fit
            # The KV cache is short of max_num_seqs x context: still predicted (the engine admits
            # what fits and preempts), but not a candidate for the cheapest.
        cost = RooflineCost(self.model, self.hw, tp, self.quantization, self.dtype, ranks_on_node=tp * replicas)
        ctx = work.max_context // 2
        parts = cost.parts(StepShape((), tuple([ctx] * max_num_seqs)))
        cand.parts_ms = {k: round(v * 1e3, 3) for k, v in parts.items()}
        rm = ReplicaModel(num_blocks=blocks, block_size=BLOCK_SIZE, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=self.max_num_batched_tokens,
                          max_model_len=max(work.max_context, 1), vocab_size=self.model.cfg.vocab_size)
        rng = np.random.default_rng(work.seed)
        arrivals = np.cumsum(rng.exponential(1 / work.rate, size=len(work.lengths))) if work.rate else \
            np.zeros(len(work.lengths))
        top = min(40000, self.model.cfg.vocab_size)
        reqs = [SimRequest(float(a), rng.integers(min(100, top - 1), top, size=i).tolist(), o)
                for a, (i, o) in zip(arrivals, work.lengths)]
        keyer = BlockKeyer(new_salt())
        res = simulate(reqs, "least-load", replicas, rm, cost, keyer, concurrency=work.concurrency)
        done = [r for r in res.requests if r.done is not None]
        ttft = [r.ttft for r in done]
        tpot = [r.tpot for r in done if r.tpot is not None]
        s = res.summary()
        cand.ttft_ms_p50 = float(np.percentile(ttft, 50) * 1e3)
        cand.ttft_ms_p90 = float(np.percentile(ttft, 90) * 1e3)
        cand.tpot_ms = float(np.percentile(tpot, 50) * 1e3) if tpot else None
        cand.tpot_ms_p90 = float(np.percentile(tpot, 90) * 1e3) if tpot else None
        cand.output_tok_s = s["output_tok_s"]
        if slo:
            cand.slo_ok = (cand.ttft_ms_p90 <= slo.get("ttft", math.inf)
                           and (cand.tpot_ms_p90 or 0.0) <= slo.get("tpot", math.inf))
        return cand

    def candidates(self, work: Workload, slo: dict, max_devices: int, tps=None, replicas=None,
                   seqs=(16, 64, 256)) -> list[Candidate]:
        max_tp = min(self.model.cfg.num_heads, self.hw.devices_per_node)
        out = []
        for tp in tps or range(1, max_tp + 1):
            for r in replicas or range(1, max_devices // tp + 1):
                for n in seqs:
                    out.append(self.evaluate(tp, r, n, work, slo))
        return out


def cheapest(cands: list[Candidate]) -> Candidate | None:
    ok = [c for c in cands if c.fits and c.slo_ok is not False]
    return min(ok, key=lambda c: (c.devices, -(c.output_tok_s or 0.0)), default=None)


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def table(cands: list[Candidate], best: Candidate | None, slo: dict) -> str:
    head = "| tp | replicas | devices | max_num_seqs | TTFT p50 ms | TTFT p90 ms | TPOT ms (p50 / p90) | output tok/s | memory GiB/device | SLO |"
    lines = [head, "|" + "---:|" * 9 + ":---|"]
    for c in sorted(cands, key=lambda c: (c.devices, c.tp, c.max_num_seqs)):
        mark = " **cheapest**" if c is best else ""
        if not c.fits and c.ttft_ms_p50 is None:
            lines.append(f"| {c.tp} | {c.replicas} | {c.devices} | {c.max_num_seqs} | - | - | - | - | "
                         f"{c.memory_gib:.1f} | does not fit: {c.why} |")
            continue
        verdict = "-" if not slo else ("meets" if c.slo_ok else "misses")
        if not c.fits:
            verdict = f"does not fit: {c.why}"
        lines.append(f"| {c.tp} | {c.replicas} | {c.devices} | {c.max_num_seqs} | {c.ttft_ms_p50:.0f} | "
                     f"{c.ttft_ms_p90:.0f} | {c.tpot_ms or 0:.1f} / {c.tpot_ms_p90 or 0:.1f} | {c.output_tok_s:.1f} | "
                     f"{c.memory_gib:.2f} | {verdict}{mark} |")
    return "\n".join(lines)


def to_json(cands: list[Candidate], best: Candidate | None, chosen: Candidate | None, meta: dict) -> str:
    out = {"meta": meta, "candidates": [asdict(c) for c in cands], "cheapest": asdict(best) if best else None}
    if chosen is not None:
        out.update({"tp": chosen.tp, "replicas": chosen.replicas, "max_num_seqs": chosen.max_num_seqs,
                    "fits": chosen.fits, "why": chosen.why, "tpot_ms": chosen.tpot_ms,
                    "ttft_ms_p50": chosen.ttft_ms_p50, "ttft_ms_p90": chosen.ttft_ms_p90,
                    "output_tok_s": chosen.output_tok_s, "slo_ok": chosen.slo_ok})
    return json.dumps(out, indent=1)

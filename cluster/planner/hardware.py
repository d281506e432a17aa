"""A machine as the planner sees it: what `tpserve profile` measured, or what a GPU's public
specifications say (marked as such).

Every cost is per rank. Matmuls are priced per weight element at a row count (the tokens of a
step): `linear_s[dtype][quantization][threads][rows]` (the model's dtype: a bfloat16 model's
layers run other kernels than a float32 one's), interpolated in log(rows). Per element, not per
byte, so one table serves every model; as rows grow the same table turns from memory-bound
(flat) to compute-bound (linear in rows). Collectives are tables of microseconds by elements.
"""
from __future__ import annotations

import bisect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.planner.model_shape import DTYPE_BYTES
from workers.errors import ConfigError


def interp(points: dict, x: float, log_x: bool = True, grow: bool = True) -> float:
    """Piecewise-linear through sorted (x, y) points (in log x), flat outside... except past the
    last point, where y grows in proportion to x (work that scales with the rows) unless not `grow`."""
    xs = sorted(float(k) for k in points)
    ys = [points[_key(points, k)] for k in xs]
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1] * (x / xs[-1] if log_x and grow else 1.0)
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0)) if log_x else (x - x0) / (x1 - x0)
    return y0 + f * (y1 - y0)


def _key(points: dict, k: float):
    for key in points:
        if float(key) == k:
            return key
    raise KeyError(k)


@dataclass
class HardwareProfile:
    name: str
    source: str  # "measured: ..." or "public specifications: ..."
    device: str  # cpu | cuda
    devices_per_node: int  # cores on CPU (a rank per core at most), GPUs on CUDA
    memory_bytes: int  # per device (CPU: the node's RAM, shared by its ranks)
    read_gbs: float  # read bandwidth of one device (CPU: of the node)
    # linear_s[dtype][quantization][threads][rows] = seconds per weight element (CPU, measured);
    # a profile from before dtypes were measured (quantizations at the top) is float32's
    linear_s: dict = field(default_factory=dict)
    # Roofline parameters (GPU profiles): bytes per element by dtype, peak FLOP/s, efficiencies.
    matmul_tflops: float = 0.0
    bandwidth_efficiency: float = 0.8
    compute_efficiency: float = 0.7
    # Attention per layer: a fixed call cost, then seconds per KV byte read (decode) and FLOP/s (prefill).
    attn_call_s: dict = field(default_factory=dict)  # threads -> s
    attn_kv_s_per_byte: dict = field(default_factory=dict)  # threads -> s/byte
    attn_prefill_flops: dict = field(default_factory=dict)  # threads -> FLOP/s
    # Collectives: op -> str(tp) -> {elements: microseconds}
    collectives: dict = field(default_factory=dict)
    # Fixed costs: per step (engine + plan + launch), per layer per step, per sampled sequence
    # (per 1,000 vocabulary entries: sampling reads the whole logits row).
    step_s: dict = field(default_factory=dict)  # threads -> s
    layer_s: dict = field(default_factory=dict)  # threads -> s
    seq_s_per_kvocab: float = 0.0
    # The served path (CPU, measured): str(tp) -> {"alone" | "served": {str(sequences): s}}, a
    # decode step of `served_model` at `served_context` tokens, its worker group stepped alone
    # (every tp), and as `tpserve serve` runs it with a `tpserve bench` client on this host (one tp);
    # "alone_by_quantization" {q: {str(sequences): s}} and "prefill" {q: {str(tokens): s}}, a prefill
    # step alone; "dtypes" {dtype: {"alone_by_quantization" (with "none"), "prefill", "served"}},
    # the same of the model in a dtype other than float32. Empty for GPU profiles: there the frontend
    # runs on host cores the GPUs do not need.
    served_s: dict = field(default_factory=dict)
    served_model: str = ""
    served_context: int = 0
    spread: dict = field(default_factory=dict)  # figure -> [min, max] over repeats (measured)

    def __post_init__(self):
        if self.linear_s and not set(self.linear_s) <= set(DTYPE_BYTES):  # a profile of float32 only, as before
            self.linear_s = {"float32": self.linear_s}

    # ---- I/O -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "HardwareProfile":
        name = str(path)
        if name in BUILTIN:
            return BUILTIN[name]()
        p = Path(path)
        if not p.is_file():
            raise ConfigError("hardware", f"{path} is neither a file nor a built-in profile "
                                          f"({', '.join(sorted(BUILTIN))})")
        try:
            data = json.loads(p.read_text())
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as e:
            raise ConfigError("hardware", f"{path} is not a tpserve hardware profile: {e}") from None

    # ---- costs ----------------------------------------------------------------------------------
    def threads(self, ranks_on_node: int) -> int:
        """CPU ranks share the node's cores: max(1, cores // ranks) threads each (as the launcher)."""
        return max(1, self.devices_per_node // ranks_on_node) if self.device == "cpu" else 1

    def linear_seconds(self, elements: float, rows: int, quantization: str, dtype_bytes: float,
                       ranks_on_node: int, dtype: str = "float32") -> float:
        """A matmul of `rows` tokens through `elements` weight elements on one rank, in a model of `dtype`."""
        if rows <= 0 or elements <= 0:
            return 0.0
        table = self.linear_s.get(dtype, {}).get(quantization, {}).get(str(self.threads(ranks_on_node)))
        if table:
            return elements * interp(table, rows)
        if self.device == "cpu":  # a CPU is priced by what was measured on it, never a roofline
            if self.linear_s and dtype not in self.linear_s:
                raise ConfigError("dtype", f"the hardware profile {self.name!r} has no {dtype} figures (it measured "
                                           f"{', '.join(sorted(self.linear_s))}); measure them with `tpserve profile "
                                           f"--dtypes {dtype}`")
            raise ConfigError("quantization", f"the hardware profile {self.name!r} has no {quantization} matmul "
                                              f"figures; measure them with `tpserve profile`")
        memory = elements * dtype_bytes / (self.read_gbs * 1e9 * self.bandwidth_efficiency)
        compute = 2 * elements * rows / (self.matmul_tflops * 1e12 * self.compute_efficiency)
        return max(memory, compute)

    def collective_us(self, op: str, tp: int, elements: float) -> float:
        if tp <= 1:
            return 0.0
        table = self.collectives.get(op, {})
        known = sorted(int(t) for t in table)
        if not known:
            raise ConfigError("hardware", f"the profile has no {op} figures")
        t = str(min(known, key=lambda k: (abs(k - tp), -k)))
        return interp(table[t], max(elements, 1.0), log_x=True)

    def served_points(self, tp: int, dtype: str = "float32") -> dict[str, dict[str, float]]:
        """The decode steps measured alone at the tp nearest `tp`, and "added": served minus alone
        at the nearest tp served ({} when none was), in `dtype` where the profile served it (else
        float32's). The profile serves one tp only (a server start costs seconds; what serving
        adds is the frontend's and client's work, the same per streamed token whatever the
        replica's tp), in each dtype it measured, since the added time depends on the step it
        stalls (2026-12-06, SmolLM2 at one sequence: +11.1 and +9.9 ms on a ~12 ms bf16 step,
        +10.6 and +10.2 ms on a ~25 ms float32 one, in two profiles)."""
        served = [k for k, v in self.served_s.items() if v.get("served")]
        if not served:
            return {}

        def nearest(keys):
            return min(keys, key=lambda k: (abs(int(k) - tp), int(k)))

        src = self.served_s[nearest(served)]
        own = src.get("dtypes", {}).get(dtype, {})
        if own.get("served"):
            alone = own["alone_by_quantization"]["none"]
            added = {n: own["served"][n] - alone[n] for n in own["served"]}
        else:
            added = {n: src["served"][n] - src["alone"][n] for n in src["served"]}
        return {**self.served_s[nearest(self.served_s)], "added": added}

    def per_thread(self, figures: dict, ranks_on_node: int) -> float:
        """A figure measured per thread count, at the threads each of these ranks gets."""
        return figures.get(str(self.threads(ranks_on_node))) or figures[max(figures, key=lambda k: int(k))]


def _gpu(name: str, memory_gib: float, read_tbs: float, tflops: float, nvlink_gbs: float, sources: str):
    """A GPU from public figures: the roofline with assumed efficiencies, NCCL ring all-reduce
    over NVLink (latency + 2 (tp - 1) / tp x bytes / bandwidth), CUDA-graph-level fixed costs."""
    def make() -> HardwareProfile:
        coll = {}
        for op in ("all_reduce", "gather", "broadcast"):
            coll[op] = {}
            for tp in (2, 4, 8):
                pts = {}
                for n in (1 << 10, 1 << 14, 1 << 18, 1 << 22, 1 << 26):
                    vol = (2 if op == "all_reduce" else 1) * (tp - 1) / tp * n * 2  # bf16 bytes
                    pts[str(n)] = 8.0 + (tp - 2) * 1.5 + vol / (nvlink_gbs * 1e9 * 0.7) * 1e6
                coll[op][str(tp)] = pts
        return HardwareProfile(
            name=name, source=f"public specifications ({sources}); efficiencies assumed: 80% of HBM "
                              f"bandwidth, 70% of dense bf16 peak, NCCL at 70% of NVLink; step and layer "
                              f"overheads assumed for CUDA graphs", device="cuda", devices_per_node=8,
            memory_bytes=int(memory_gib * 2**30), read_gbs=read_tbs * 1000, matmul_tflops=tflops,
            attn_call_s={"1": 4e-6}, attn_kv_s_per_byte={"1": 1 / (read_tbs * 1e12 * 0.7)},
            attn_prefill_flops={"1": tflops * 1e12 * 0.5}, collectives=coll, step_s={"1": 1.5e-3}, layer_s={"1": 15e-6},
            seq_s_per_kvocab=2e-7)
    return make


BUILTIN = {
    "h100": _gpu("NVIDIA H100 SXM 80GB", 80, 3.35, 989, 450, "HBM3 3.35 TB/s, 989 TFLOPS dense bf16, "
                 "NVLink 4 900 GB/s bidirectional"),
    "h200": _gpu("NVIDIA H200 SXM 141GB", 141, 4.8, 989, 450, "HBM3e 4.8 TB/s, 989 TFLOPS dense bf16, "
                 "NVLink 4 900 GB/s bidirectional"),
    "a100": _gpu("NVIDIA A100 SXM 80GB", 80, 2.039, 312, 300, "HBM2e 2.04 TB/s, 312 TFLOPS dense bf16, "
                 "NVLink 3 600 GB/s bidirectional"),
}

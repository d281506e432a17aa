"""The step cost of a configuration, from a hardware profile: the simulator's cost model for the
planner. Per step, on the slowest (largest) rank:

    linear     projections: elements x seconds per element at the step's rows (memory-bound at few
               rows, compute-bound at many: the profile's table or the GPU roofline); the LM head
               at the rows that sample (int8 in a quantized model on CPU)
    attention  per layer a call cost, decode reads every context token's K/V, prefill FLOPs
               4 x heads x head_dim x new tokens x mean context
    collectives 2 all-reduces of tokens x hidden per layer, the logits gather, the plan broadcast
               (Pope et al.'s 2 x batch x d_model per layer for 1-D weight sharding)
    fixed      per step (engine, plan, launch), per layer (op dispatch), per sampled row (sampling
               reads a whole vocabulary row)
    served     the served path's calibration (CPU profiles that measured it), from the profile's
               decode steps of a model alone and served (the frontend's streaming, the Ray
               poll, detokenizing, a client on the same cores): the step alone over this
               model's price of it in the same quantization scales every step's price (what
               the terms above miss of a real model's step), and served minus alone is added
               (what serving costs); both linear between the measured points (the step alone at 1, 4,
               16 and 64 sequences and a 256-token prefill, keyed by the step's tokens; served at
               one sequence since 2026-12-05, at 1 and 16 before, keyed by its sequences), flat
               outside them
"""
from __future__ import annotations

from dataclasses import dataclass

from cluster.planner.hardware import HardwareProfile, interp
from cluster.planner.model_shape import DTYPE_BYTES, INT8_HEAD, READ_BYTES, ModelShape
from cluster.modelled_executor import StepShape


@dataclass
class RooflineCost:
    model: ModelShape
    hw: HardwareProfile
    tp: int
    quantization: str = "none"
    dtype: str = "float32"
    ranks_on_node: int | None = None  # CPU: ranks sharing the node's cores (default: tp)

    def __post_init__(self):
        self.rank = self.model.rank(self.tp)
        c = self.model.cfg
        self.layers, self.hidden, self.head_dim = c.num_layers, c.hidden_size, c.head_dim
        self.dbytes = DTYPE_BYTES[self.dtype]
        self.kv_token_layer_bytes = 2 * self.rank.kv_heads * self.head_dim * self.dbytes
        hw, ranks = self.hw, self.ranks_on_node or self.tp
        self.attn_call = hw.per_thread(hw.attn_call_s, ranks)
        self.attn_byte = hw.per_thread(hw.attn_kv_s_per_byte, ranks)
        self.attn_flops = hw.per_thread(hw.attn_prefill_flops, ranks)
        self.fixed = hw.per_thread(hw.step_s, ranks) + self.layers * hw.per_thread(hw.layer_s, ranks)
        self.per_row = hw.seq_s_per_kvocab * c.vocab_size / 1000
        self._scale, self._added = self._served_calibration()

    def _served_calibration(self) -> tuple[dict[str, float], dict[str, float]]:
        """({str(sequences): alone / priced}, {str(sequences): served - alone}) at the profile's
        served points. The scale comes from the step alone in this quantization where the
        profile measured it (a quantization it did not, w8a8, takes int8's), else unquantized, in the
        model's dtype ("dtypes": the profile's steps alone in a dtype other than float32); what
        serving adds was measured unquantized, in this dtype where the profile served it, and
        applies to every quantization."""
        points = self.hw.served_points(self.tp, self.dtype)
        if not points:
            return {}, {}
        added = points["added"]
        by_quant, prefill = points.get("alone_by_quantization", {}), points.get("prefill", {})
        unquantized = points["alone"]
        own = points.get("dtypes", {}).get(self.dtype)
        if own:  # measured in this dtype: "none" is one of its quantizations
            by_quant, prefill = own["alone_by_quantization"], own.get("prefill", {})
            unquantized = by_quant["none"]
        measured_q = self.quantization
        if measured_q not in by_quant:
            measured_q = "int8" if measured_q != "none" and "int8" in by_quant else "none"
        alone = unquantized if measured_q == "none" else by_quant[measured_q]
        # Priced as it was measured: in that quantization, one replica's ranks on the node.
        measured_as = self.quantization == measured_q and (self.ranks_on_node or self.tp) == self.tp
        priced = self if measured_as else RooflineCost(self.model, self.hw, self.tp, measured_q, self.dtype, self.tp)
        ctx = self.hw.served_context
        scale = {n: t / sum(priced.engine_parts(StepShape((), (ctx,) * int(n))).values()) for n, t in alone.items()}
        # A prefill step alone (a profile may lack one), at its tokens: past the decode steps'
        # 64 tokens the steps are mostly prefill chunks, which that scale priced 10-25% off.
        for n, t in prefill.get(measured_q, {}).items():
            scale[n] = t / sum(priced.engine_parts(StepShape(((int(n), 0),), ())).values())
        return scale, added

    def parts(self, shape: StepShape) -> dict[str, float]:
        parts = self.engine_parts(shape)
        if self._added:
            # The scale by the step's tokens (the matmuls' rows, which it mostly corrects: a decode
            # step of n sequences is n tokens, a 512-token prefill chunk runs compute-bound as 64
            # decoding sequences do, not memory-bound as one does); what serving adds by sequences
            # (each streams, detokenizes and is polled on its own).
            rows = max(1, len(shape.decode) + len(shape.prefill))
            scale = interp(self._scale, max(1, shape.tokens), log_x=False, grow=False) if self._scale else 1.0
            parts["served"] = (scale - 1.0) * sum(parts.values()) + interp(self._added, rows, log_x=False, grow=False)
        else:
            parts["served"] = 0.0
        return parts

    def engine_parts(self, shape: StepShape) -> dict[str, float]:
        """The step's price by term, before the served path's calibration."""
        hw, tp, r = self.hw, self.tp, self.rank
        tokens = shape.tokens
        rows = len(shape.decode) + len(shape.prefill)  # rows that reach the LM head (one per sequence)
        read = READ_BYTES[self.quantization] or self.dbytes
        ranks = self.ranks_on_node or tp
        # int8's and int4's LM head is int8 on CPU (workers/layers/embedding.py); w8a8's stays float.
        head = "int8" if hw.device == "cpu" and self.quantization in INT8_HEAD else "none"
        linear = hw.linear_seconds(r.proj_elements, tokens, self.quantization, read, ranks, self.dtype) \
            + hw.linear_seconds(r.lm_head_elements, rows, head, READ_BYTES[head] or self.dbytes, ranks, self.dtype)
        kv_read = sum(shape.decode) * self.kv_token_layer_bytes
        prefill_flops = sum(4 * r.q_heads * self.head_dim * n * (start + (n + 1) / 2) for n, start in shape.prefill)
        attention = self.layers * (self.attn_call * (bool(shape.decode) + len(shape.prefill))
                                   + kv_read * self.attn_byte + prefill_flops / self.attn_flops)
        comm = 0.0
        if tp > 1:
            comm = (2 * self.layers * hw.collective_us("all_reduce", tp, tokens * self.hidden)
                    + hw.collective_us("gather", tp, rows * r.vocab_rows)
                    + hw.collective_us("broadcast", tp, 128)) * 1e-6
        return {"linear": linear, "attention": attention, "collectives": comm,
                "fixed": self.fixed + self.per_row * rows}

    def step_time(self, shape: StepShape) -> float:
        return sum(self.parts(shape).values())

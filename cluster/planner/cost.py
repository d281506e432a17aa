"""The step cost of a configuration, from a hardware profile: the simulator's cost model for the
planner. Per step, on the slowest (largest) rank:

    linear     projections: elements x seconds per element at the step's rows (memory-bound at few
               rows, compute-bound at many: the profile's table or the GPU roofline); the LM head
               at the rows that sample
    attention  per layer a call cost, decode reads every context token's K/V, prefill FLOPs
               4 x heads x head_dim x new tokens x mean context
    collectives 2 all-reduces of tokens x hidden per layer, the logits gather, the plan broadcast
               (Pope et al.'s 2 x batch x d_model per layer for 1-D weight sharding)
    fixed      per step (engine, plan, launch), per layer (op dispatch), per sampled row (sampling
               reads a whole vocabulary row)
"""
from __future__ import annotations

from dataclasses import dataclass

from cluster.planner.hardware import HardwareProfile
from cluster.planner.model_shape import DTYPE_BYTES, READ_BYTES, ModelShape
from cluster.simulator import StepShape


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

    def parts(self, shape: StepShape) -> dict[str, float]:
        hw, tp, r = self.hw, self.tp, self.rank
        tokens = shape.tokens
        rows = len(shape.decode) + len(shape.prefill)  # rows that reach the LM head (one per sequence)
        read = READ_BYTES[self.quantization] or self.dbytes
        ranks = self.ranks_on_node or tp
        linear = hw.linear_seconds(r.proj_elements, tokens, self.quantization, read, ranks) \
            + hw.linear_seconds(r.lm_head_elements, rows, "none", self.dbytes, ranks)
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

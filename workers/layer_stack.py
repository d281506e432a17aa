"""A decode step's stack of Llama decoder layers as one C++ call (`tpserve::llama_decode_layers`,
workers/csrc/decoder_layers.cpp), on CPU.

Why: at batch 1 a bf16 + int4 SmolLM2 token took ~11 ms, of which its kernels ~6.6 ms; the rest
was Python and dispatch around 30 layers x ~12 op calls (nn.Module calls, each linear method's
row-count choice, casts, the paged cache's bookkeeping). The op runs the same kernels on the same
inputs in the same order, so its output is bit-equal to the eager layers' (tests/workers/
test_layer_stack.py); only the Python between them is gone.

Which kernel each projection takes stays the linear method's choice: `decode_call(layer, rows)`
returns the call its `apply` would make at that many rows, as a code the op carries out. A step
the op cannot carry out runs the layers in Python as before: tp > 1 without the shared-memory
collectives (gloo; the op runs their all-reduces itself, workers/csrc/shm_all_reduce.h), a prefill
or a gathered decode in the step, a compiled step, a projection whose call has no code
(int8/int4 dequantized past their packed rows, the Python GEMV), no built kernels, or
`TPSERVE_LAYER_STACK=off` (for comparisons).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from workers import fused_ops
from workers.errors import WorkerError

# How a projection multiplies; the numbers are decoder_layers.cpp's LinearKind.
DENSE, ONEDNN, GEMV, INT8_PACKED, INT4_PACKED, W8A8, INT4_GEMV = range(7)


class DecodeCall(NamedTuple):
    """One projection's call: its kind, an integer argument (int4's group size, w8a8's GEMV flag),
    its two tensors (the weight or codes; scales or None) and its bias or None."""

    kind: int
    arg: int
    a: torch.Tensor
    b: torch.Tensor | None
    bias: torch.Tensor | None


def enabled_by_env() -> bool:
    return os.environ.get("TPSERVE_LAYER_STACK", "on").lower() not in ("off", "0", "false")


class LayerStack:
    """Runs `layers` (LlamaDecoderLayer) for a decode step in one op where it can (see the module)."""

    def __init__(self, layers, group, eager_before_attention):
        """`group`: the layers' TPGroup; `eager_before_attention`: the layers' own eager region; a
        layer holding another (the compiled step's) runs in Python."""
        self.layers, self.group, self.eager = layers, group, eager_before_attention
        self.enabled = enabled_by_env()
        self._plans: dict[int, tuple[list, list[int]] | None] = {}  # rows -> (params, kinds), or None: Python
        self.steps = 0  # steps the op carried out

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch):
        """(x, residual) after the last layer, or None: the caller runs the layers itself."""
        if not self.enabled or not fused_ops.serves(x):
            return None
        group, shm = self.group, None
        if group.size > 1:
            if group.shm is None or group.local_only:
                return None
            shm = group.shm
        attn = batch.attn
        in_place = getattr(attn, "in_place", None)
        rows = x.shape[0]
        if in_place is None or attn.prefills or attn.decode_groups or in_place.rows.shape[0] != rows:
            return None
        first = self.layers[0]
        if first.before_attention is not self.eager:  # the compiled step's regions are in place
            return None
        cache = attn.cache
        if cache.k.dtype != x.dtype or cache.k.dim() != 5:
            return None
        plan = self._plans.get(rows, False)
        if plan is False:
            plan = self._plans[rows] = self._plan(rows)
        if plan is None:
            return None
        params, kinds = plan
        a = first.self_attn.attn
        state = None if shm is None else shm.stack_state()
        try:
            out = torch.ops.tpserve.llama_decode_layers(
                x, rope[0], rope[1], params, kinds, cache.k, cache.v, attn.slot_mapping, in_place.tables,
                in_place.lens, in_place.rows, in_place.kv_index(a.heads, a.num_heads), a.scale,
                a.sliding_window or 0, first.input_layernorm.eps, a.num_heads, a.num_kv_heads, state)
        except RuntimeError as e:  # a peer that died or hung, as ShmCommunicator raises it
            if "tpserve-shm: " in str(e):
                raise WorkerError(str(e).split("tpserve-shm: ", 1)[1].split("\n", 1)[0]) from None
            raise
        self.steps += 1
        if state is not None:
            waited = shm.take_stack_state(state)
            if group.timed:
                group.comm_seconds += waited
        return out

    def _plan(self, rows: int):
        """Every layer's norms and projections at `rows` rows, in the op's order; None if any
        projection has no code or the layers differ in what the op takes once."""
        def once(layer):  # what the op takes once for every layer
            a = layer.self_attn.attn
            return (a.scale, a.sliding_window, a.num_heads, a.num_kv_heads, layer.input_layernorm.eps,
                    layer.post_attention_layernorm.eps)

        params, kinds = [], []
        for layer in self.layers:
            if once(layer) != once(self.layers[0]):
                return None
            params += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            for proj in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                         layer.mlp.down_proj):
                call = proj.quant_method.decode_call(proj, rows)
                if call is None:
                    return None
                params += [call.a, call.b, call.bias]
                kinds += [call.kind, call.arg]
        return params, kinds

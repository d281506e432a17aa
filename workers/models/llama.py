"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2) built from tensor-parallel layers.

Per block: qkv_proj (column, by heads) -> attention -> o_proj (row, all-reduce);
gate_up_proj (column) -> SwiGLU -> down_proj (row, all-reduce). Two all-reduces per block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers import fused_ops
from workers.config import ModelConfig
from workers.errors import UnsupportedArchitectureError
from workers.layers.attention import Attention
from workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from workers.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from workers.layers.norm import RMSNorm
from workers.layers.rotary import RotaryEmbedding
from workers.layer_stack import LayerStack
from workers.models.batch import ForwardBatch
from workers.parallel import TPGroup, head_shard
from workers.quantization import QuantConfig


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, group: TPGroup, dtype, device,
                 quant: QuantConfig | None = None):
        super().__init__()
        shard = head_shard(cfg.num_heads, cfg.num_kv_heads, group.size, group.rank)
        d = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, cfg.num_heads, cfg.num_kv_heads, shard,
                                          cfg.attention_bias, dtype, device, quant)
        # o_proj's input is this rank's heads, so its cut follows the head ranges.
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size, cfg.o_proj_bias, group, dtype, device,
                                        input_range=(shard.q_start * d, shard.q_end * d), quant=quant, name="o_proj")
        self.attn = Attention(layer_idx, shard, d, d ** -0.5, device, sliding_window=cfg.sliding_window)
        self.num_heads, self.num_kv_heads, self.head_dim = shard.num_heads, shard.num_kv_heads, d

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q, k (rotated), v of this rank's heads: [T, heads, d]."""
        t = x.shape[0]
        q, k, v = self.qkv_proj(x)
        q, k = RotaryEmbedding.rotate(q.view(t, self.num_heads, self.head_dim),
                                      k.view(t, self.num_kv_heads, self.head_dim), cos, sin)
        return q, k, v.view(t, self.num_kv_heads, self.head_dim)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, group: TPGroup, dtype, device, quant: QuantConfig | None = None):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise UnsupportedArchitectureError(f"hidden_act {cfg.hidden_act!r}: the Llama family supports 'silu'")
        i = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [i, i], cfg.mlp_bias, group, dtype, device,
                                                       quant)
        self.down_proj = RowParallelLinear(i, cfg.hidden_size, cfg.mlp_bias, group, dtype, device, quant=quant,
                                           name="down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if fused_ops.serves(gate_up) and gate_up.dim() == 2 and gate_up.stride(1) == 1:
            return self.down_proj(torch.ops.tpserve.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, group: TPGroup, dtype, device, quant=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype, device)
        self.self_attn = LlamaAttention(cfg, layer_idx, group, dtype, device, quant)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype, device)
        self.mlp = LlamaMLP(cfg, group, dtype, device, quant)

        # The regions around attention; workers/compiled_step.py may swap in compiled ones.
        self.before_attention, self.after_attention = _before_attention, _after_attention

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, residual: torch.Tensor | None,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (the embeddings at the first layer, residual None);
        residual: the stream x is added to. Returns this layer's (MLP output, residual): each add
        happens inside the next norm (`RMSNorm.add_forward`), as vLLM's layers pass the residual."""
        q, k, v, residual = self.before_attention(self, x, residual, *rope)
        o = self.self_attn.attn(q, k, v, batch.attn)  # the paged cache: eager, reads block tables
        return self.after_attention(self, o, residual)


def _before_attention(layer: LlamaDecoderLayer, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                      sin: torch.Tensor):
    if residual is None:
        residual, h = x, layer.input_layernorm(x)
    else:
        residual, h = layer.input_layernorm.add_forward(x, residual)
    return (*layer.self_attn.project(h, cos, sin), residual)


def _after_attention(layer: LlamaDecoderLayer, o: torch.Tensor, residual: torch.Tensor):
    residual, h = layer.post_attention_layernorm.add_forward(layer.self_attn.o_proj(o), residual)
    return layer.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, group: TPGroup, dtype, device, quant: QuantConfig | None = None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, group, dtype, device)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, group, dtype, device, quant)
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype, device)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling,
                                      device)
        # A decode step's layers in one C++ call where it can (workers/layer_stack.py): same kernels,
        # same result, without the Python between them.
        self.layer_stack = LayerStack(self.layers, group, _before_attention)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)
        rope = self.rotary.cos_sin(batch.positions)  # once per step, for every layer
        stacked = self.layer_stack.forward(x, rope, batch)
        if stacked is not None:
            x, residual = stacked
        else:
            residual = None
            for layer in self.layers:
                x, residual = layer(rope, x, residual, batch)
        return self.norm.add_forward(x, residual)[1] if residual is not None else self.norm(x)


class LlamaForCausalLM(nn.Module):
    """A Llama-family model sharded over a TP group; logits come back on rank 0 only."""

    # Our fused parameter <- the checkpoint tensors it is cut from, with the part each one fills.
    packed_modules = {"qkv_proj": [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")],
                      "gate_up_proj": [("gate_proj", 0), ("up_proj", 1)]}

    def __init__(self, cfg: ModelConfig, group: TPGroup, dtype: torch.dtype, device, quant: QuantConfig | None = None):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, group, dtype, device, quant)
        tie = self.model.embed_tokens if cfg.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, group, dtype, device, tie_to=tie, quant=quant)

    def checkpoint_sources(self, param_name: str) -> list[tuple[str, object, bool]]:
        """(checkpoint tensor, shard id, stored transposed) for each tensor that fills a parameter."""
        for fused, parts in self.packed_modules.items():
            if f".{fused}." in param_name:
                return [(param_name.replace(fused, part), sid, False) for part, sid in parts]
        return [(param_name, None, False)]

    def forward(self, batch: ForwardBatch) -> torch.Tensor | None:
        hidden = self.model(batch)
        return self.lm_head(hidden.index_select(0, batch.logits_indices))

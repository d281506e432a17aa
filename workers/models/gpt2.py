"""GPT-2: learned positions, LayerNorm, GELU, a fused c_attn cut per head, Conv1D weights.

Conv1D stores weights [in, out]; the loader hands the layers a transposed view, so the same
column/row cuts apply. c_attn's [q; k; v] columns are cut per head, not as one block, or a rank
would get q of some heads and k/v of others.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.config import ModelConfig
from workers.errors import UnsupportedArchitectureError
from workers.layers.attention import Attention
from workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from workers.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from workers.layers.norm import LayerNorm
from workers.models.batch import ForwardBatch
from workers.parallel import TPGroup, head_shard
from workers.tensor_source import TensorSource, copy_into

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}
# Conv1D layers: their checkpoint weights are stored [in, out].
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, group: TPGroup, dtype, device):
        super().__init__()
        shard = head_shard(cfg.num_heads, cfg.num_heads, group.size, group.rank)
        d, e = cfg.head_dim, cfg.hidden_size
        self.c_attn = QKVParallelLinear(e, d, cfg.num_heads, cfg.num_heads, shard, True, dtype, device)
        self.c_proj = RowParallelLinear(e, e, True, group, dtype, device, input_range=(shard.q_start * d, shard.q_end * d))
        scale = d ** -0.5 / ((layer_idx + 1) if cfg.scale_attn_by_inverse_layer_idx else 1)
        self.attn = Attention(layer_idx, shard, d, scale, device)
        self.num_heads, self.head_dim = shard.num_heads, d

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = (y.view(t, self.num_heads, self.head_dim) for y in self.c_attn(x))
        return self.c_proj(self.attn(q, k, v, batch.attn))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, group: TPGroup, dtype, device):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise UnsupportedArchitectureError(f"activation_function {cfg.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.c_fc = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, True, group, dtype, device)
        self.c_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, True, group, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, group: TPGroup, dtype, device):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.hidden_size, cfg.norm_eps, dtype, device)
        self.attn = GPT2Attention(cfg, layer_idx, group, dtype, device)
        self.ln_2 = LayerNorm(cfg.hidden_size, cfg.norm_eps, dtype, device)
        self.mlp = GPT2MLP(cfg, group, dtype, device)

    def forward(self, x, batch):
        x = x + self.attn(self.ln_1(x), batch)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, cfg: ModelConfig, group: TPGroup, dtype, device):
        super().__init__()
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, group, dtype, device)
        # Learned positions are replicated: small, and every rank needs every row.
        self.wpe = nn.Parameter(torch.empty(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype, device=device),
                                requires_grad=False)
        self.wpe.weight_loader = lambda p, src, shard_id=None: copy_into(p, src.read(), src.name)
        self.h = nn.ModuleList(GPT2Block(cfg, i, group, dtype, device) for i in range(cfg.num_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.norm_eps, dtype, device)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        x = self.wte(batch.input_ids) + F.embedding(batch.positions, self.wpe)
        for block in self.h:
            x = block(x, batch)
        return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 sharded over a TP group (heads, MLP columns, vocab rows)."""

    def __init__(self, cfg: ModelConfig, group: TPGroup, dtype: torch.dtype, device):
        super().__init__()
        self.config = cfg
        self.transformer = GPT2Model(cfg, group, dtype, device)
        tie = self.transformer.wte if cfg.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, group, dtype, device, tie_to=tie)

    def checkpoint_sources(self, param_name: str) -> list[tuple[str, object, bool]]:
        name = "transformer.wpe.weight" if param_name == "transformer.wpe" else param_name
        return [(name, None, name.endswith(CONV1D))]

    def forward(self, batch: ForwardBatch) -> torch.Tensor | None:
        hidden = self.transformer(batch)
        return self.lm_head(hidden.index_select(0, batch.logits_indices))

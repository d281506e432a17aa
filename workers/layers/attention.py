"""Attention over the KV cache for one rank's heads."""
from __future__ import annotations

import torch
from torch import nn

from workers.kv_cache import AttentionBatch, HeadLayout
from workers.parallel import HeadShard


class Attention(nn.Module):
    """Scaled dot-product attention of this rank's query heads over its KV heads.

    The query-to-KV map is explicit because an uneven head cut can start mid-group: at tp 2 on
    9 heads / 3 KV heads, rank 0's heads 0-4 read KV heads [0,0,0,1,1].
    """

    def __init__(self, layer_idx: int, shard: HeadShard, head_dim: int, scale: float, device=None,
                 sliding_window: int | None = None):
        super().__init__()
        self.layer_idx, self.head_dim, self.scale = layer_idx, head_dim, scale
        self.sliding_window = sliding_window
        self.num_heads, self.num_kv_heads = shard.num_heads, shard.num_kv_heads
        self.heads = HeadLayout.build(shard.kv_index(), shard.num_kv_heads, device)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionBatch) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] (positions already applied) -> [T, H * D]."""
        t = q.shape[0]
        out = attn.attend(self.layer_idx, q, k, v, self.heads, self.scale, self.sliding_window)
        return out.reshape(t, self.num_heads * self.head_dim)

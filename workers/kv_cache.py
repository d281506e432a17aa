"""The KV-cache interface the models attend through, and a simple contiguous cache.

A model never touches cache storage: each attention layer calls `batch.attn.attend(layer, q, k, v)`
with this step's new tokens, flattened over sequences. The cache stores k/v and returns each
token's attention output over its sequence's whole past. `paged_cache.PagedKVCache` implements
it; the models do not know which cache they run on.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
import torch
import torch.nn.functional as F


class AttentionBatch(ABC):
    """One step's view of the cache: where each sequence's new tokens go and what they read."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_index: torch.Tensor | None, scale: float) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] for the new tokens -> output [T, H, D].

        kv_index maps each local query head to its local KV head (None: one KV head per query head).
        """


def expand_kv(x: torch.Tensor, kv_index: torch.Tensor | None) -> torch.Tensor:
    """[KVH, S, D] -> [H, S, D] by the query-to-KV head map (GQA, possibly uneven per rank)."""
    return x if kv_index is None else x.index_select(0, kv_index)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """q [H, n, D] at positions start..start+n-1 against k/v [H, start+n, D]."""
    n = q.shape[1]
    if n == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = torch.ones(n, start + n, dtype=torch.bool, device=q.device).tril(diagonal=start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

"""The KV-cache interface the models attend through, and a simple contiguous cache.

A model never touches cache storage: each attention layer calls `batch.attn.attend(layer, q, k, v)`
with this step's new tokens, flattened over sequences. The cache stores k/v and returns each
token's attention output over its sequence's whole past. The paged cache (engine) implements the
same method, so the models do not change.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class SeqChunk:
    """A sequence's new tokens in a step: its cache slot, how many tokens precede, how many are new."""

    slot: int
    start: int
    length: int


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


class ContiguousKVCache:
    """Per-layer [slots, KVH, max_len, D] buffers: one slot per live sequence, for prefill then decode."""

    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def batch(self, chunks: list[SeqChunk]) -> "ContiguousAttentionBatch":
        for c in chunks:
            if c.start + c.length > self.max_len:
                raise ValueError(f"sequence in slot {c.slot} needs {c.start + c.length} positions, cache holds {self.max_len}")
        return ContiguousAttentionBatch(self, chunks)


class ContiguousAttentionBatch(AttentionBatch):
    def __init__(self, cache: ContiguousKVCache, chunks: list[SeqChunk]):
        self.cache, self.chunks = cache, chunks

    def attend(self, layer, q, k, v, kv_index, scale):
        out = torch.empty_like(q)
        offset = 0
        for c in self.chunks:
            end = offset + c.length
            kc, vc = self.cache.k[layer, c.slot], self.cache.v[layer, c.slot]
            kc[:, c.start:c.start + c.length] = k[offset:end].transpose(0, 1)
            vc[:, c.start:c.start + c.length] = v[offset:end].transpose(0, 1)
            keys = expand_kv(kc[:, :c.start + c.length], kv_index)
            values = expand_kv(vc[:, :c.start + c.length], kv_index)
            o = causal_attention(q[offset:end].transpose(0, 1), keys, values, c.start, scale)
            out[offset:end] = o.transpose(0, 1)
            offset = end
        return out

"""The KV-cache interface the models attend through.

A model never touches cache storage: each attention layer calls `batch.attn.attend(layer, q, k, v,
heads, scale)` with this step's new tokens, flattened over sequences. The cache stores k/v and
returns each token's attention output over its sequence's whole past. `paged_cache.PagedKVCache`
implements it; the models do not know which cache they run on.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class HeadLayout:
    """How this rank's query heads read its KV heads (GQA, possibly cut mid-group).

    kv_index[h]: local KV head of local query head h (None when it is the identity, i.e. MHA).
    grid [KVH, gmax]: local query heads grouped by KV head, padded by repeating a member; with
    `inverse` it turns a decode step's heads into KVH "sequences" of gmax queries each, so one SDPA
    call serves all groups without copying K/V per query head.
    """

    kv_index: torch.Tensor | None
    grid: torch.Tensor | None  # None when groups are already uniform and contiguous
    inverse: torch.Tensor | None
    num_kv_heads: int
    group: int  # gmax

    @classmethod
    def build(cls, kv_index: list[int], num_kv_heads: int, device=None) -> "HeadLayout":
        groups = [[h for h, j in enumerate(kv_index) if j == k] for k in range(num_kv_heads)]
        gmax = max(len(g) for g in groups)
        identity = kv_index == list(range(len(kv_index)))
        uniform = all(len(g) == gmax for g in groups)  # contiguous by construction (cuts are contiguous)
        grid = inverse = None
        if not uniform:
            grid = torch.tensor([g + [g[0]] * (gmax - len(g)) for g in groups], device=device).flatten()
            inverse = torch.tensor([k * gmax + g.index(h) for h in range(len(kv_index))
                                    for k, g in enumerate(groups) if h in g], device=device)
        kvi = None if identity else torch.tensor(kv_index, device=device)
        return cls(kvi, grid, inverse, num_kv_heads, gmax)


class AttentionBatch(ABC):
    """One step's view of the cache: where each sequence's new tokens go and what they read."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               heads: HeadLayout, scale: float, window: int | None = None) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] for the new tokens -> output [T, H, D]. With `window`, a
        token at position p reads keys at positions (p - window, p] only (Mistral's sliding window)."""


def expand_kv(x: torch.Tensor, kv_index: torch.Tensor | None) -> torch.Tensor:
    """[KVH, S, D] -> [H, S, D] by the query-to-KV head map."""
    return x if kv_index is None else x.index_select(0, kv_index)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float,
                     window: int | None = None) -> torch.Tensor:
    """q [H, n, D] at positions start..start+n-1 against k/v [H, start+n, D]; with `window`, the
    query at position p sees keys (p - window, p] only."""
    n = q.shape[1]
    if window is None or start + n <= window:  # no query is far enough along to lose a key
        if n == 1:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if start == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = torch.ones(n, start + n, dtype=torch.bool, device=q.device).tril(diagonal=start)
    if window is not None:
        mask &= ~torch.ones_like(mask).tril(diagonal=start - window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

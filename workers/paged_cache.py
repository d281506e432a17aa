"""The paged KV cache: per layer, a flat pool of num_blocks * block_size slots for this rank's
KV heads. A sequence's token at position p lives in slot table[p // bs] * bs + p % bs.

Attention for a step: every new token's k/v is written to its slot first (one index_copy per
layer), then decoding sequences (one new token each) attend in one batched SDPA over their
gathered, padded contexts, and prefill chunks attend one sequence at a time (causal, offset by
what is already cached).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.kv_cache import AttentionBatch, causal_attention, expand_kv


@dataclass(frozen=True, slots=True)
class PagedSeq:
    """A sequence's part of a step: tokens [start, start + length) with its block table."""

    start: int
    length: int
    block_table: list[int]


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size, self.device = num_blocks, block_size, device

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def batch(self, seqs: list[PagedSeq]) -> "PagedAttentionBatch":
        return PagedAttentionBatch(self, seqs)


class PagedAttentionBatch(AttentionBatch):
    """Index tensors for one step, built once and reused by every layer."""

    def __init__(self, cache: PagedKVCache, seqs: list[PagedSeq]):
        self.cache = cache
        bs, dev = cache.block_size, cache.device
        slot_mapping, decode_rows, decode_ctx, self.prefills = [], [], [], []
        row = 0
        for s in seqs:
            table = torch.tensor(s.block_table, dtype=torch.long)
            ctx_pos = torch.arange(s.start + s.length)
            ctx_slots = table[ctx_pos // bs] * bs + ctx_pos % bs
            slot_mapping.append(ctx_slots[s.start:])
            if s.length == 1:
                decode_rows.append(row)
                decode_ctx.append(ctx_slots)
            else:
                self.prefills.append((row, s.length, s.start, ctx_slots.to(dev)))
            row += s.length
        self.slot_mapping = torch.cat(slot_mapping).to(dev) if slot_mapping else torch.empty(0, dtype=torch.long)
        self.decode_rows = torch.tensor(decode_rows, dtype=torch.long, device=dev) if decode_rows else None
        if decode_rows:
            lens = torch.tensor([len(c) for c in decode_ctx])
            width = int(lens.max())
            gather = torch.zeros(len(decode_ctx), width, dtype=torch.long)
            for i, c in enumerate(decode_ctx):
                gather[i, :len(c)] = c
            self.decode_gather = gather.to(dev)
            # [B, 1, 1, width]: True where a key position belongs to the sequence
            self.decode_mask = (torch.arange(width)[None, :] < lens[:, None]).to(dev)[:, None, None, :]

    def attend(self, layer, q, k, v, kv_index, scale):
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc.index_copy_(0, self.slot_mapping, k)
        vc.index_copy_(0, self.slot_mapping, v)
        out = torch.empty_like(q)
        if self.decode_rows is not None:
            keys = kc[self.decode_gather].transpose(1, 2)  # [B, KVH, W, D]
            values = vc[self.decode_gather].transpose(1, 2)
            if kv_index is not None:
                keys, values = keys.index_select(1, kv_index), values.index_select(1, kv_index)
            qd = q.index_select(0, self.decode_rows).unsqueeze(2)  # [B, H, 1, D]
            o = F.scaled_dot_product_attention(qd, keys, values, attn_mask=self.decode_mask, scale=scale)
            out.index_copy_(0, self.decode_rows, o.squeeze(2))
        for row, length, start, ctx_slots in self.prefills:
            keys = expand_kv(kc[ctx_slots].transpose(0, 1), kv_index)  # [H, L, D]
            values = expand_kv(vc[ctx_slots].transpose(0, 1), kv_index)
            o = causal_attention(q[row:row + length].transpose(0, 1), keys, values, start, scale)
            out[row:row + length] = o.transpose(0, 1)
        return out

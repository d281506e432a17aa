"""The paged KV cache: per layer, num_blocks blocks of block_size slots for this rank's KV heads.
A sequence's token at position p lives in block table[p // bs], offset p % bs.

Attention for a step: every new token's k/v is written to its slot first (one
`tpserve::cache_write` per layer on CPU, workers/fused_ops.py; else an index_copy_ each), then
decoding sequences (one new token each) attend, short spans past a cached context (a speculative
verify's k + 1 tokens) attend batched as decodes do, and prefill chunks attend one sequence at a
time (causal, offset by what is already cached). Decode takes one of two paths,
chosen per machine at start-up (`gather_up_to`, workers/paged_decode_op.py; gather unless the
probe times the kernel faster):
- in place (CPU): one call of `tpserve::paged_decode` reads every sequence's blocks where they lie
  through its block table, K and V once per (sequence, KV head);
- gather: batched SDPAs over gathered, padded block lists (one per group of similar length:
  `group_by_length`). Gathers move whole blocks (contiguous bs x KVH x D chunks), and decode never
  copies K/V per query head (see HeadLayout). CUDA, and CPUs without the built kernel, take it.
  Spans take the same path as the step's decodes: grouped by their length when gathered, one
  kernel row per span row in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers import fused_ops
from workers.huge_pages import huge_page_zeros
from workers.kv_cache import AttentionBatch, HeadLayout, causal_attention, expand_kv
from workers.trace import region

# A span of up to this many new tokens past a cached context (a speculative verify) attends with
# the decoding sequences' batched path rather than as a prefill chunk of its own.
MAX_SPAN_ROWS = 16


@dataclass(frozen=True, slots=True)
class PagedSeq:
    """A sequence's part of a step: tokens [start, start + length) with its block table."""

    start: int
    length: int
    block_table: list[int]


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        # Read every step, like the weights: in 2 MiB pages on CPU (workers/huge_pages.py).
        self.k, self.v = huge_page_zeros(shape, dtype, device), huge_page_zeros(shape, dtype, device)
        self.num_blocks, self.block_size, self.device = num_blocks, block_size, device
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        # Decode steps of up to this many sequences gather; more read the cache in place. The
        # worker sets it from the start-up probe; until then (and on CUDA) always gather.
        self.gather_up_to = 1 << 30

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
        slots, decode_rows, decode_tables, decode_lens, self.prefills = [], [], [], [], []
        spans: dict[int, tuple[list[int], list[list[int]], list[int]]] = {}  # length -> rows, tables, lens
        row = span_rows = 0
        for s in seqs:
            # Slots in Python: a decode step's one slot per sequence costs less than the four small
            # tensors (arange, table, index, multiply-add) it took at each step, 0.3 ms at batch 1.
            table = s.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(s.start, s.start + s.length)]
            nb = -(-(s.start + s.length) // bs)
            if s.length == 1:
                decode_rows.append(row)
                decode_tables.append(s.block_table[:nb])
                decode_lens.append(s.start + 1)
            elif s.start > 0 and s.length <= MAX_SPAN_ROWS:
                rows, tables, lens = spans.setdefault(s.length, ([], [], []))
                rows.append(row)
                tables.append(s.block_table[:nb])
                lens.append(s.start + s.length)
                span_rows += s.length
            else:
                self.prefills.append((row, s.length, s.start, torch.tensor(table[:nb], dtype=torch.long, device=dev)))
            row += s.length
        self.slot_mapping = torch.tensor(slots, dtype=torch.long, device=dev)
        self.in_place = None
        if len(decode_rows) + span_rows > cache.gather_up_to:
            # In place, a span's row j is one more decoding row whose context ends at its own
            # position (start + j), through the same block table: the kernel reads that context once
            # per row, where the gather path copies it once per span and reads it once.
            for length, (rows, tables, lens) in spans.items():
                for r, t, n in zip(rows, tables, lens):
                    decode_rows += [r + j for j in range(length)]
                    decode_tables += [t] * length
                    decode_lens += [n - length + 1 + j for j in range(length)]
            spans = {}
            self.in_place = _InPlaceDecode(decode_rows, decode_tables, decode_lens)
        # Gathered, decoding sequences attend in groups of similar length: one padded SDPA over all
        # of them gathers and scans every sequence's blocks up to the longest one's (at 64
        # sequences of mixed length, about twice the K/V each needs); a few groups cost a few calls.
        self.decode_groups = [] if self.in_place else [
            _DecodeGroup(cache, [decode_rows[i] for i in g], [decode_tables[i] for i in g],
                         [decode_lens[i] for i in g])
            for g in group_by_length([len(t) for t in decode_tables])]
        # Short spans past a cached context (a speculative verify's k + 1 tokens) attend the same
        # way, grouped by span length: one SDPA per group instead of one masked SDPA per sequence
        # over its own gathered and head-expanded K/V (at 16 sequences of 2 rows that way, attention
        # took as long as the step's matmuls, and the step 2.4x a one-row step: 2026-12-05).
        for length, (rows, tables, lens) in sorted(spans.items()):
            self.decode_groups += [
                _DecodeGroup(cache, [rows[i] for i in g], [tables[i] for i in g], [lens[i] for i in g], length)
                for g in group_by_length([len(t) for t in tables])]

    def attend(self, layer, q, k, v, heads, scale, window=None):
        with region("tpserve.attention"):
            return self._attend(layer, q, k, v, heads, scale, window)

    def _attend(self, layer, q, k, v, heads: HeadLayout, scale, window):
        kc, vc = self.cache.k[layer], self.cache.v[layer]  # [NB, bs, KVH, D]
        nb, bs, kvh, d = kc.shape
        if fused_ops.serves(k) and _rows_of_heads(k, d) and _rows_of_heads(v, d) and k.dtype == v.dtype == kc.dtype:
            torch.ops.tpserve.cache_write(kc, vc, self.slot_mapping, k, v)  # one call for two index_copy_
        else:
            kc.view(nb * bs, kvh, d).index_copy_(0, self.slot_mapping, k)
            vc.view(nb * bs, kvh, d).index_copy_(0, self.slot_mapping, v)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if self.in_place is not None:
            self.in_place.attend(q.contiguous(), kc, vc, heads, scale, window, out)
        for grp in self.decode_groups:
            b, w = grp.tables.shape
            r = grp.span
            flat = grp.tables.view(-1)  # index_select on dim 0 copies whole blocks (memcpy)
            keys = kc.index_select(0, flat).view(b, w * bs, kvh, d).transpose(1, 2)  # [B, KVH, W, D]
            values = vc.index_select(0, flat).view(b, w * bs, kvh, d).transpose(1, 2)
            qd = q.index_select(0, grp.rows)  # [B * R, H, D]
            if heads.grid is not None:
                qd = qd.index_select(1, heads.grid)
            # Each KV head's query group plays the role of a query axis: no K/V copy per query head.
            # A span's R rows join that axis, row-major: [B, KVH, R * G, D].
            qd = qd.view(b, r, kvh, heads.group, d).transpose(1, 2).reshape(b, kvh, r * heads.group, d)
            o = F.scaled_dot_product_attention(qd, keys, values, attn_mask=grp.mask(window, heads.group), scale=scale)
            o = o.view(b, kvh, r, heads.group, d).transpose(1, 2).reshape(b * r, kvh * heads.group, d)
            if heads.inverse is not None:
                o = o.index_select(1, heads.inverse)
            out.index_copy_(0, grp.rows, o)
        for row, length, start, table in self.prefills:
            ctx = start + length
            keys = kc.index_select(0, table).view(-1, kvh, d)[:ctx].transpose(0, 1)  # [KVH, L, D]
            values = vc.index_select(0, table).view(-1, kvh, d)[:ctx].transpose(0, 1)
            keys, values = expand_kv(keys, heads.kv_index), expand_kv(values, heads.kv_index)
            o = causal_attention(q[row:row + length].transpose(0, 1), keys, values, start, scale, window)
            out[row:row + length] = o.transpose(0, 1)
        return out


def _rows_of_heads(t: torch.Tensor, d: int) -> bool:
    """[T, KVH, D] with each row's heads contiguous (rows may be strided: v is a view of qkv's)."""
    return t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == d


def group_by_length(widths: list[int], max_waste: float = 1.25, min_group: int = 4) -> list[list[int]]:
    """Indices of `widths` (blocks per sequence) in groups of similar width: sorted, a group closes
    when padding its members to the next one's width would read more than max_waste x what they
    need (and it holds at least min_group members: each group is one more SDPA call)."""
    order = sorted(range(len(widths)), key=lambda i: widths[i])
    groups: list[list[int]] = []
    cur: list[int] = []
    need = 0
    for i in order:
        w = widths[i]
        if len(cur) >= min_group and (len(cur) + 1) * w > max_waste * (need + w):
            groups.append(cur)
            cur, need = [], 0
        cur.append(i)
        need += w
    if cur:
        groups.append(cur)
    return groups


class _InPlaceDecode:
    """Every decoding sequence of the step in one `tpserve::paged_decode` call: rows, block tables
    (padded; only each sequence's own blocks are read) and lengths, built once per step."""

    _kv_of: dict[int, torch.Tensor] = {}  # query heads -> the identity map (MHA), shared

    def __init__(self, rows: list[int], tables: list[list[int]], lens: list[int]):
        width = max(len(t) for t in tables)
        self.tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        self.rows = torch.tensor(rows, dtype=torch.long)
        self.lens = torch.tensor(lens, dtype=torch.long)

    @classmethod
    def kv_index(cls, heads: HeadLayout, num_heads: int) -> torch.Tensor:
        """Each query head's KV head as `tpserve::paged_decode` takes it (the identity for MHA)."""
        if heads.kv_index is not None:
            return heads.kv_index
        kv_of = cls._kv_of.get(num_heads)
        if kv_of is None:
            kv_of = cls._kv_of[num_heads] = torch.arange(num_heads)
        return kv_of

    def attend(self, q, kc, vc, heads: HeadLayout, scale, window, out) -> None:
        torch.ops.tpserve.paged_decode(q, kc, vc, self.tables, self.lens, self.rows, self.kv_index(heads, q.shape[1]),
                                       scale, window or 0, out)


class _DecodeGroup:
    """Sequences attended in one padded SDPA: each has `span` new tokens (1: decoding; more: a
    speculative verify) at the end of its context. Their rows (span rows each, in order), block
    tables and lengths (tokens including the last new one)."""

    def __init__(self, cache: PagedKVCache, rows: list[int], tables: list[list[int]], lens: list[int],
                 span: int = 1):
        dev = cache.device
        width = max(len(t) for t in tables)
        padded = torch.zeros(len(tables), width, dtype=torch.long)
        for i, t in enumerate(tables):
            padded[i, :len(t)] = torch.tensor(t)
        self.cache, self.span = cache, span
        self.rows = torch.tensor([r + j for r in rows for j in range(span)], dtype=torch.long, device=dev)
        self.tables = padded.to(dev)
        self.lens = torch.tensor(lens)
        self._masks: dict[int | None, torch.Tensor] = {}

    def mask(self, window: int | None, group: int) -> torch.Tensor:
        """[B, 1, 1, W] (span 1) or [B, 1, span * group, W]: True where a key position belongs to
        the sequence, at or before the query row's own position (and within the window); built once
        per step and window, then shared by every layer."""
        mask = self._masks.get(window)
        if mask is None:
            width = self.tables.shape[1] * self.cache.block_size
            # Row j of a span sits at position lens - span + j and sees keys up to it.
            ends = self.lens[:, None] - self.span + 1 + torch.arange(self.span)[None, :]  # [B, R]
            pos = torch.arange(width)[None, None, :]
            keep = pos < ends[:, :, None]  # [B, R, W]
            if window is not None:
                keep &= pos >= ends[:, :, None] - window
            if self.span > 1:  # each row's mask for every query head of its group
                keep = keep[:, :, None, :].expand(-1, -1, group, -1).reshape(len(self.lens), 1, self.span * group,
                                                                             width)
            else:
                keep = keep[:, None, :, :]
            mask = self._masks[window] = keep.to(self.cache.device)
        return mask

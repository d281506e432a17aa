"""Paged attention equals plain causal attention over the same keys, for every uneven head cut."""
import pytest
import torch
import torch.nn.functional as F

from workers.kv_cache import HeadLayout
from workers.paged_cache import PagedKVCache, PagedSeq
from workers.parallel import head_shard


def reference(q, k, v, kv_index, start, window=None):
    """q [n, H, D] at positions start.. ; k/v [start+n, KVH, D]; heads expanded the plain way."""
    k = k[:, kv_index].transpose(0, 1)
    v = v[:, kv_index].transpose(0, 1)
    n = q.shape[0]
    mask = torch.ones(n, start + n, dtype=torch.bool).tril(diagonal=start)
    if window is not None:  # position p sees keys (p - window, p]
        mask &= ~torch.ones_like(mask).tril(diagonal=start - window)
    return F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask).transpose(0, 1)


@pytest.mark.parametrize("window", [None, 3, 6])
@pytest.mark.parametrize(("tp", "rank"), [(1, 0), (2, 0), (2, 1), (4, 0), (4, 2), (4, 3)])
def test_decode_and_prefill_chunks_match_plain_attention(tp, rank, window):
    """Decodes, a prefill, a chunk, and short spans past a cached context (speculative verifies:
    two of 3 rows, batched in one group, and one of 2) in one step."""
    torch.manual_seed(0)
    shard = head_shard(9, 3, tp, rank)
    heads = HeadLayout.build(shard.kv_index(), shard.num_kv_heads)
    h, kvh, d, bs = shard.num_heads, shard.num_kv_heads, 8, 4
    cache = PagedKVCache(1, 32, bs, kvh, d, torch.float64, "cpu")
    lens = [(13, 1), (6, 1), (0, 7), (5, 4), (9, 3), (17, 3), (3, 2), (4, 20)]  # (already cached, new)
    tables = [[3, 9, 1, 30], [7, 2], [4, 5], [11, 12, 13], [14, 15, 16], [17, 18, 19, 20, 21], [22, 23],
              [24, 25, 26, 27, 28, 29]]
    full_k = [torch.randn(s + n, kvh, d, dtype=torch.float64) for s, n in lens]
    full_v = [torch.randn(s + n, kvh, d, dtype=torch.float64) for s, n in lens]
    for (s, _), t, k, v in zip(lens, tables, full_k, full_v):  # what earlier steps wrote
        for p in range(s):
            cache.k[0, t[p // bs], p % bs] = k[p]
            cache.v[0, t[p // bs], p % bs] = v[p]
    qs = [torch.randn(n, h, d, dtype=torch.float64) for _, n in lens]
    batch = cache.batch([PagedSeq(s, n, t) for (s, n), t in zip(lens, tables)])
    # The spans past a cached context attend batched, grouped by their row count; only the
    # prefill from 0 and the span longer than MAX_SPAN_ROWS attend one by one.
    assert sorted(g.span for g in batch.decode_groups) == [1, 2, 3, 4]
    assert [len(g.rows) for g in batch.decode_groups if g.span == 3] == [6]
    assert [(s, n) for _, n, s, _ in batch.prefills] == [(0, 7), (4, 20)]
    out = batch.attend(0, torch.cat(qs), torch.cat([k[s:] for (s, _), k in zip(lens, full_k)]),
                       torch.cat([v[s:] for (s, _), v in zip(lens, full_v)]), heads, d ** -0.5, window)
    kv_index = shard.kv_index()
    expected = torch.cat([reference(q, k, v, kv_index, s, window)
                          for q, k, v, (s, _) in zip(qs, full_k, full_v, lens)])
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_decode_groups_cover_every_sequence_once_and_bound_the_padding():
    from workers.paged_cache import group_by_length

    g = torch.Generator().manual_seed(5)
    widths = torch.randint(1, 40, (64,), generator=g).tolist()
    groups = group_by_length(widths)
    assert sorted(i for grp in groups for i in grp) == list(range(64))
    assert 1 < len(groups) < 64  # mixed lengths split, but not one call per sequence
    for grp in groups:
        need = sum(widths[i] for i in grp)
        padded = len(grp) * max(widths[i] for i in grp)
        assert padded <= 1.25 * need or len(grp) <= 4
    assert group_by_length([7] * 10) == [list(range(10))]  # equal lengths: one call

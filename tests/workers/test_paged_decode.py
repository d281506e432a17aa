"""The in-place paged decode kernel (tpserve::paged_decode) against the gather path it replaces,
on the same cache and step: the same attention output for every decoding row, whatever the head
layout, dtype, window, block order and lengths, with prefill chunks and speculative spans in the
same step."""
from __future__ import annotations

import random

import pytest
import torch

from workers.kv_cache import HeadLayout
from workers.paged_cache import PagedKVCache, PagedSeq
from workers.paged_decode_op import available, gather_up_to

pytestmark = pytest.mark.skipif(not available(), reason="no C++ compiler: the gather path is the only one here")

LAYOUTS = {  # name: (each local query head's KV head, KV heads)
    "mha": ([0, 1, 2, 3], 4),
    "gqa": ([0, 0, 0, 1, 1, 1, 2, 2, 2], 3),  # SmolLM2 at tp 1
    "cut": ([0, 0, 1], 2),  # a tp cut mid-group: KV head 1 serves one query head here
}


def run_step(layout, dtype, window, gather: bool, seed: int = 0, d: int = 16):
    kv_of, kvh = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    bs, nblocks = 4, 96
    cache = PagedKVCache(2, nblocks, bs, kvh, d, dtype, "cpu")
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    cache.gather_up_to = 1 << 30 if gather else 0
    free = list(range(nblocks))
    rnd.shuffle(free)  # block tables out of order, as after eviction and reuse
    seqs = []
    for length in (1, 3, 9, 17, 1, 40, 2):
        seqs.append(PagedSeq(length - 1, 1, [free.pop() for _ in range(-(-length // bs))]))
    seqs.insert(3, PagedSeq(5, 6, [free.pop() for _ in range(3)]))  # a prefill chunk between decodes
    # Speculative verifies: spans of 3 and 2 rows past a cached context, each row its own causal end.
    seqs.insert(1, PagedSeq(10, 3, [free.pop() for _ in range(4)]))
    seqs.append(PagedSeq(6, 2, [free.pop() for _ in range(2)]))
    t = sum(s.length for s in seqs)
    q = torch.randn(t, len(kv_of), d, generator=g).to(dtype)
    k = torch.randn(t, kvh, d, generator=g).to(dtype)
    v = torch.randn(t, kvh, d, generator=g).to(dtype)
    heads = HeadLayout.build(kv_of, kvh)
    return cache.batch(seqs).attend(1, q, k, v, heads, d ** -0.5, window)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("head_dim", [16, 24, 64])  # 16 and 64 take the AVX-512 score path where there is one
def test_in_place_decode_equals_the_gather_path(layout, dtype, window, head_dim):
    got = run_step(layout, dtype, window, gather=False, d=head_dim)
    want = run_step(layout, dtype, window, gather=True, d=head_dim)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_the_in_place_path_serves_only_above_the_chosen_count():
    cache = PagedKVCache(1, 8, 4, 1, 8, torch.float32, "cpu")
    seqs = [PagedSeq(2, 1, [i]) for i in range(3)]
    cache.gather_up_to = 3
    assert cache.batch(seqs).in_place is None and cache.batch(seqs).decode_groups
    cache.gather_up_to = 2
    assert cache.batch(seqs).in_place is not None and not cache.batch(seqs).decode_groups
    # A span's rows count, and join the kernel's rows: two decodes and a 2-row span are 4 rows.
    spans = [PagedSeq(2, 1, [0]), PagedSeq(2, 1, [1]), PagedSeq(1, 2, [2])]
    cache.gather_up_to = 3
    batch = cache.batch(spans)
    assert not batch.decode_groups and batch.in_place.rows.tolist() == [0, 1, 2, 3]
    assert batch.in_place.lens.tolist() == [3, 3, 2, 3]


def test_the_choice_is_timed_once_per_machine_and_cached(tmp_path):
    from workers.kernel_probe import KernelProbe

    probe = KernelProbe(tmp_path / "k.json")
    first = gather_up_to(probe, 3, [0, 0, 0, 1, 1, 1, 2, 2, 2], 64, 16, torch.float32)
    assert probe.measured == 1 and first in (0, 1 << 30)  # in place always, or gather always
    again = KernelProbe(tmp_path / "k.json")
    assert gather_up_to(again, 3, [0, 0, 0, 1, 1, 1, 2, 2, 2], 64, 16, torch.float32) == first
    assert again.measured == 0
    assert gather_up_to(None, 3, [0, 0, 0, 1, 1, 1, 2, 2, 2], 64, 16, torch.float32) == 1 << 30  # no probe: gather

"""`torch.ops.tpserve.paged_decode`: decode attention read in place from the paged KV cache on CPU
(workers/csrc/paged_decode.cpp, built by workers/cpu_kernels.py), and the start-up choice of it.

`TPSERVE_PAGED_DECODE=off` keeps the gather path, and `always` takes the in-place kernel whatever
the probe says (both for comparisons and tests). Otherwise the probe decides: the gather path,
unless this kernel beats it by the probe's margin at every probed batch. Measured on 2026-12-04's
AVX2 EPYC its first, scalar-loop version did not (0.93x the gather path's throughput at 64
sequences); the vectorized one gave 1.38x (bf16) and 1.20x (fp32) at 64 requests on 2026-12-05's
AVX-512 EPYC (`benchmarks.decode_attention`, docs/benchmarks.md).
"""
from __future__ import annotations

import os

import torch

from workers import cpu_kernels


def available() -> bool:
    """Whether the op is loaded in this process (built first if this machine has no build yet)."""
    return _mode() not in ("off", "0", "false") and cpu_kernels.available()


def _mode() -> str:
    return os.environ.get("TPSERVE_PAGED_DECODE", "on").lower()


PROBE_SEQS = (1, 4, 16, 64)
PROBE_CONTEXT = 256  # tokens per probed sequence


def gather_up_to(probe, num_kv_heads: int, num_heads_of: list[int], head_dim: int, block_size: int,
                 dtype: torch.dtype) -> int:
    """Decoding sequences up to which the gather path serves: 0 (the in-place kernel always) only
    where the probe times the kernel faster than the gather path by its margin at every probed
    count, on a scratch one-layer cache of this rank's shape; else (and with no probe) the gather
    path always. `num_heads_of`: each local query head's KV head."""
    if not available() or dtype not in (torch.float32, torch.bfloat16):  # the kernel's dtypes
        return 1 << 30
    if _mode() == "always":
        return 0
    if probe is None:
        return 1 << 30
    from workers.kv_cache import HeadLayout
    from workers.paged_cache import PagedKVCache, PagedSeq

    per_seq = -(-PROBE_CONTEXT // block_size)
    heads = HeadLayout.build(num_heads_of, num_kv_heads)
    scale = head_dim ** -0.5

    def build(n: int, in_place: bool):
        cache = PagedKVCache(1, n * per_seq, block_size, num_kv_heads, head_dim, dtype, "cpu")
        cache.k.normal_(), cache.v.normal_()
        cache.gather_up_to = 0 if in_place else 1 << 30
        seqs = [PagedSeq(PROBE_CONTEXT - 1, 1, list(range(i * per_seq, (i + 1) * per_seq))) for i in range(n)]
        q = torch.randn(n, len(num_heads_of), head_dim, dtype=dtype)
        k = torch.randn(n, num_kv_heads, head_dim, dtype=dtype)
        attn = cache.batch(seqs)
        return lambda: attn.attend(0, q, k, k, heads, scale)

    # The decision is named after the build, so a changed kernel is timed again.
    wins_up_to = probe.rows_limit(f"paged_decode_in_place@{cpu_kernels.build_key()}",
                                  (num_kv_heads, len(num_heads_of), head_dim, block_size),
                                  dtype, PROBE_SEQS, candidate=lambda n: build(n, True),
                                  incumbent=lambda n: build(n, False), default=0)
    return 0 if wins_up_to == PROBE_SEQS[-1] else 1 << 30

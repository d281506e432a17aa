"""Weights and the KV cache in 2 MiB pages (Linux transparent huge pages), on CPU.

A batch-1 decode step streams every weight once: SmolLM2-135M in float32 reads 513 MiB per token,
131,000 pages of 4 KiB. With this machine's kernel set to `madvise` (transparent huge pages only
where a program asks), PyTorch's allocator leaves tensors in 4 KiB pages, and a stream through
them misses the TLB at every page. Measured on 2026-12-06's AVX-512 EPYC (2 cores, one process,
the same 226 MiB buffer in both page sizes, interleaved):

    one thread:  a sum 18.4 -> 27.7 GB/s, tpserve::gemv 14 -> 18 GB/s
    two threads: a sum 30.6 -> 35.1 GB/s, tpserve::gemv 25 -> 25-27 GB/s

and a batch-1 token went from 21.2 / 24.4 to 17.6 / 18.5 ms in float32 and from 6.3 / 6.5 to
5.9 / 6.1 ms in bf16 + int4 (fresh processes, alternating; docs/benchmarks.md).

So after loading, a rank copies its parameters into one arena whose pages are advised
MADV_HUGEPAGE before first touch, and the KV cache is allocated the same way. oneDNN's packed
weights are opaque tensors that cannot be placed (they serve 2+ rows, where a step is less bound
by reading). `TPSERVE_HUGE_PAGES=off` keeps PyTorch's own allocations, for comparisons.
"""
from __future__ import annotations

import logging
import math
import mmap
import os
import sys

import torch
from torch import nn

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def available() -> str | None:
    """None when huge pages can be asked for here; else why not."""
    if os.environ.get("TPSERVE_HUGE_PAGES", "on").lower() in ("off", "0", "false"):
        return "TPSERVE_HUGE_PAGES=off"
    if not sys.platform.startswith("linux"):
        return "transparent huge pages are Linux's"
    try:
        with open(_THP_SETTING) as f:
            setting = f.read()
    except OSError:
        return f"no {_THP_SETTING}"
    if "[never]" in setting:
        return "the kernel's transparent huge pages are off ([never])"
    return None


def huge_page_bytes(nbytes: int) -> torch.Tensor:
    """A zero-filled uint8 CPU tensor of `nbytes` (the kernel's fresh pages) whose memory starts on a 2 MiB boundary
    and is advised MADV_HUGEPAGE before anything touches it, so the kernel backs the first touch of
    each 2 MiB with one page.

    The memory is a fresh private anonymous mapping of its own, not PyTorch's allocator: glibc serves
    an allocation under its mmap threshold (which grows to 32 MiB as large blocks are freed) from heap
    memory a freed tensor already touched in 4 KiB pages, and advice given then changes nothing until
    khugepaged gets round to it. (CI's tiny-model test found its arena there, with 0 kB in huge pages.)
    The tensor keeps the mapping alive; the last view's release unmaps it. The rounding to whole
    pages, and up to 2 MiB before the boundary, are never touched, so they cost no memory."""
    span = (nbytes + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE  # whole pages, even for a small arena
    if span == 0:
        return torch.empty(0, dtype=torch.uint8)
    region = mmap.mmap(-1, span + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # holds `region` for as long as it lives
    skip = -raw.data_ptr() % HUGE_PAGE
    try:
        region.madvise(mmap.MADV_HUGEPAGE, skip, span)
    except OSError as e:  # advice only: the memory works in 4 KiB pages all the same
        log.warning("madvise(MADV_HUGEPAGE) failed: %s", e)
    return raw[skip:skip + nbytes]


def huge_page_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """torch.zeros(shape, dtype, device): on CPU in huge pages where `available()`."""
    if torch.device(device).type != "cpu" or available() is not None:
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    # The mapping is zero already; the write faults every page in now, at load, as torch.zeros did,
    # rather than during the first steps that reach each block.
    return huge_page_bytes(nbytes).view(dtype).view(shape).zero_()


def place_weights(model: nn.Module) -> int:
    """Moves the model's dense CPU parameters into one huge-page arena (tied parameters stay tied);
    returns the bytes placed, 0 where huge pages are not available or nothing is on the CPU. Call
    after the weights are loaded and packed, before the first step (the layer stack keeps pointers
    to what it reads)."""
    if available() is not None:
        return 0
    first: dict[tuple, nn.Parameter] = {}
    placed: list[nn.Parameter] = []
    ties: list[tuple[nn.Parameter, nn.Parameter]] = []
    for _, p in model.named_parameters(remove_duplicate=False):
        if p.device.type != "cpu" or p.layout != torch.strided or not p.is_contiguous() or p.numel() == 0:
            continue
        key = (p.data_ptr(), tuple(p.shape), p.dtype)
        if key in first:
            if first[key] is not p:
                ties.append((p, first[key]))
            continue
        first[key] = p
        placed.append(p)
    if not placed:  # e.g. a CUDA model
        return 0
    # Each parameter starts on a cache line, as PyTorch's allocator places them.
    sizes = [(p.numel() * p.element_size() + 63) // 64 * 64 for p in placed]
    arena = huge_page_bytes(sum(sizes))
    offset = 0
    with torch.no_grad():
        for p, size in zip(placed, sizes):
            nbytes = p.numel() * p.element_size()
            view = arena[offset:offset + nbytes].view(p.dtype).view(p.shape)
            view.copy_(p.data)
            p.data = view
            offset += size
        for p, q in ties:
            p.data = q.data
    return offset

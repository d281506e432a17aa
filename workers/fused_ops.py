"""The decoder layer's small ops fused on CPU (workers/csrc/fused_ops.cpp, built by
workers/cpu_kernels.py): RMSNorm with the residual add before it, rotary embedding, SiLU-and-multiply,
the write of a step's keys and values into the paged cache (workers/paged_cache.py), and the greedy
argmax over the logits.

Each replaces 5-15 PyTorch ops of the same arithmetic (the reference's float32 math, rounded to the
dtype where Hugging Face's Llama rounds), so no probe chooses them: where they serve, they are
less work. They serve float32 and bfloat16 CPU tensors while the kernels are loaded, and not
while torch.compile traces a region (workers/compiled_step.py): there the PyTorch ops are traced,
and inductor fuses them itself. `TPSERVE_FUSED_OPS=off` keeps PyTorch's ops (for comparisons).
"""
from __future__ import annotations

import os

import torch

from workers import cpu_kernels

_DTYPES = (torch.float32, torch.bfloat16)


def serves(t: torch.Tensor) -> bool:
    """Whether the fused ops take this tensor (read per call, so a test or benchmark can switch)."""
    return (not torch.compiler.is_compiling() and t.device.type == "cpu" and t.dtype in _DTYPES
            and os.environ.get("TPSERVE_FUSED_OPS", "on").lower() not in ("off", "0", "false")
            and cpu_kernels.available())


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> argmax per row (the first index of the largest value, NaN counting as
    largest, as torch.argmax). ATen's argmax loops over each row on one thread: 2.5 ms at
    [64, 49152] float32 and 5.7 ms on bfloat16 on 2026-12-06's EPYC, where this takes 0.4-0.6 ms
    without casting bf16 logits to float32 first (another 0.9-2.8 ms)."""
    if serves(logits) and logits.dim() == 2 and logits.stride(1) == 1 and logits.shape[1] > 0:
        return torch.ops.tpserve.argmax(logits)
    return logits.argmax(-1)

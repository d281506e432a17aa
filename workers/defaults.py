"""A replica's defaults, each defined once: the engine, the workers, the CLI, the frontend, the
simulator and the planner import them from here (no torch: the planner and the CLI stay light)."""
from __future__ import annotations

MAX_NUM_SEQS = 64  # sequences a replica's engine runs at once
MAX_NUM_BATCHED_TOKENS = 512  # tokens per step (prefill chunks + decodes)
BLOCK_SIZE = 16  # tokens per KV block
CPU_KV_CACHE_BYTES = 256 << 20  # KV-cache budget per CPU rank when --kv-cache-memory is unset
GPU_MEMORY_UTILIZATION = 0.85  # share of a GPU's free memory for the KV cache
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def default_dtype(device: str) -> str:
    """bfloat16 on CUDA (its tensor cores), float32 on the CPU."""
    return "bfloat16" if device == "cuda" else "float32"

"""What one forward step receives: flattened new tokens of every sequence plus the cache view."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.kv_cache import AttentionBatch


@dataclass(slots=True)
class ForwardBatch:
    """input_ids/positions: [T] over all sequences; logits_indices: rows whose logits are wanted."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionBatch
    logits_indices: torch.Tensor

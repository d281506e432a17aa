"""Vocab-parallel embedding and LM head: both cut the vocab rows by the shard rule.

The embedding looks up the ids that fall in this rank's rows, zeroes the rest and all-reduces.
The head computes logits for its rows and gathers them on rank 0, which alone samples.
Tied embeddings: the head reuses the embedding's shard (same rows on the same rank).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.kernel_probe import KernelProbe
from workers.layers.linear_method import PlainLinear
from workers.parallel import TPGroup, shard_range, split_sizes
from workers.tensor_source import TensorSource, copy_into


class VocabParallelEmbedding(nn.Module):
    """Embedding table cut by vocab rows."""

    def __init__(self, vocab_size: int, hidden_size: int, group: TPGroup, dtype: torch.dtype, device=None):
        super().__init__()
        self.group = group
        self.vocab_size = vocab_size
        self.sizes = split_sizes(vocab_size, group.size)
        self.start, self.end = shard_range(vocab_size, group.size, group.rank)
        self.weight = nn.Parameter(torch.empty(self.end - self.start, hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, src: TensorSource, shard_id=None) -> None:
        copy_into(param, src.read_rows(self.start, self.end), src.name)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.end)
        local = torch.where(mine, ids - self.start, torch.zeros_like(ids))
        out = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.group.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """LM head cut by vocab rows; full logits are gathered on rank 0 only."""

    def __init__(self, vocab_size: int, hidden_size: int, group: TPGroup, dtype: torch.dtype, device=None,
                 tie_to: VocabParallelEmbedding | None = None):
        super().__init__(vocab_size, hidden_size, group, dtype, device)
        if tie_to is not None:
            self.weight = tie_to.weight  # one shard serves both
        self.quant_method = PlainLinear()  # the head stays in the model's dtype

    def finish_loading(self, probe: KernelProbe | None) -> None:
        self.quant_method.process_weights_after_loading(self, probe)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits [.., vocab] on rank 0; None on the other ranks."""
        return self.group.gather_last_dim(self.quant_method.apply(self, hidden), self.sizes)

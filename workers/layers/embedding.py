"""Vocab-parallel embedding and LM head: both cut the vocab rows by the shard rule.

The embedding looks up the ids that fall in this rank's rows, zeroes the rest and all-reduces.
The head computes logits for its rows and gathers them on rank 0, which alone samples.
Tied embeddings: the head reuses the embedding's shard (same rows on the same rank).

A quantized model on CPU also quantizes its head to int8, at load, from this rank's float rows: at
one row the head was 40-55% of a token's matmuls in float32 and its int8 kernel ran it 2.6x faster
(issue 20). int8 for an int4 model too: an int4 head cost SmolLM2 6.3% of perplexity (its int4
projections alone: 0.0%; the bound is 6%), and int8 is how llama.cpp's 4-bit files keep their
output layer. A w8a8 model's head stays in the model's dtype: w8a8 serves many sequences at
once, where the int8 head (dequantized past the packed kernel's rows) was the slower one, and its
activations' rounding would reach the logits directly.
A vocab row is one output row of int8's format, so each rank's codes are the same rows of one
quantized matrix whatever the tp. On CUDA the head stays in the model's dtype: the quantized path
there dequantizes on every call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.kernel_probe import KernelProbe
from workers.layers.linear_method import PlainLinear, linear_method, param
from workers.parallel import TPGroup, shard_range, split_sizes
from workers.quantization import QuantConfig
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
                 tie_to: VocabParallelEmbedding | None = None, quant: QuantConfig | None = None):
        super().__init__(vocab_size, hidden_size, group, dtype, device)
        self.tied = tie_to is not None
        if self.tied:
            self.weight = tie_to.weight  # one shard serves both
        self.quant = quant if quant is not None and quant.enabled and quant.method != "w8a8" else None
        self.quant_method = PlainLinear()
        self.quantized: nn.Module | None = None  # after loading: this rank's rows in the quantized format

    @property
    def format(self) -> str:
        return "none" if self.quantized is None else self.quantized.quant.tag

    def finish_loading(self, probe: KernelProbe | None) -> None:
        if self.quantized is not None:
            return
        if self.quant is None or self.weight.device.type != "cpu":
            self.quant_method.process_weights_after_loading(self, probe)
            return
        w = self.weight.data
        head = QuantConfig("int8")
        method = linear_method(head)
        held = nn.Module()
        held.quant, held.bias, held.model_dtype = head, None, self.weight.dtype
        for name, value in method.quantize(w).items():
            setattr(held, name, param(*value.shape, dtype=value.dtype, device=value.device))
            getattr(held, name).data.copy_(value)
        method.process_weights_after_loading(held, probe)
        self.quantized, self.quant_method = held, method
        if not self.tied:
            self.weight = None  # the float rows served only the head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits [.., vocab] on rank 0; None on the other ranks."""
        held = self if self.quantized is None else self.quantized
        return self.group.gather_last_dim(self.quant_method.apply(held, hidden), self.sizes)

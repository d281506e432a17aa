"""Normalisation layers; replicated on every rank (they are small and per-token)."""
from __future__ import annotations

import torch
from torch import nn

from workers import fused_ops
from workers.tensor_source import TensorSource, copy_into


def _replicated_loader(param: nn.Parameter, src: TensorSource, shard_id=None) -> None:
    copy_into(param, src.read(), src.name)


class RMSNorm(nn.Module):
    """Llama's RMSNorm, computed in float32 like the reference; on CPU one fused op
    (workers/fused_ops.py) where the PyTorch form is nine."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.weight.weight_loader = _replicated_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x):
            return torch.ops.tpserve.rms_norm(x, self.weight, self.eps)
        return self._reference(x)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + x, the norm of that sum): the residual stream's next value and this
        norm's output, as vLLM's fused_add_rms_norm (the add rounds to the dtype first, as the
        reference's `residual + x` does)."""
        if self._fused(x) and residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1:
            return torch.ops.tpserve.add_rms_norm(x, residual, self.weight, self.eps)
        residual = residual + x
        return residual, self._reference(residual)

    def _fused(self, x: torch.Tensor) -> bool:
        return fused_ops.serves(x) and x.dim() == 2 and x.stride(1) == 1 and self.weight.dtype == x.dtype

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LayerNorm(nn.Module):
    """GPT-2's LayerNorm with weight and bias."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.weight.weight_loader = _replicated_loader
        self.bias.weight_loader = _replicated_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)

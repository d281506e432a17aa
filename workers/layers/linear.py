"""Megatron-style linear layers.

Column-parallel layers split the output dim and need no communication; row-parallel layers
split the input dim and end with one all-reduce. Column then row = one all-reduce per pair.
Weights are logical [out, in]; a checkpoint that stores [in, out] (GPT-2's Conv1D) is read
through a transposed view, so the same cut applies.

With a `QuantConfig` the column, merged, qkv and row layers hold the format of their
`quant_method` (workers/layers/linear_method.py: int8 or int4 codes and scales), loaded by the same
cut as the weight they replace (a row-parallel layer's int8 scales are whole on every rank; its
int4 groups are cut with its columns).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.kernel_probe import KernelProbe
from workers.layers.linear_method import LinearMethod, linear_method, param
from workers.parallel import HeadShard, TPGroup, shard_range
from workers.quantization import QuantConfig
from workers.tensor_source import TensorSource, copy_into


class LinearBase(nn.Module):
    """A linear layer whose weight format is its `quant_method`'s (linear_method.py): the layer
    decides the cut, the method what is held and how it multiplies."""

    def _make_weight(self, out_local: int, in_local: int, dtype, device, quant: QuantConfig | None,
                     loader, what: str, in_range: tuple[int, int] | None = None) -> None:
        """`in_range`: this rank's cut of the input (row-parallel), else the whole input."""
        self.model_dtype = dtype
        self.quant_method: LinearMethod = linear_method(quant)
        self.quant_method.create_weights(self, out_local, in_local, dtype, device, loader, what, in_range)

    def finish_loading(self, probe: KernelProbe | None) -> None:
        """Once, after the weights are loaded: the method's packing and its kernel choice here."""
        self.quant_method.process_weights_after_loading(self, probe)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.quant_method.apply(self, x.reshape(-1, shape[-1]))
        return y.view(*shape[:-1], y.shape[-1])


class ReplicatedLinear(nn.Module):
    """A linear layer every rank holds whole (small projections)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.weight = param(out_features, in_features, dtype=dtype, device=device)
        self.weight.weight_loader = lambda p, src, shard_id=None: copy_into(p, src.read(), src.name)
        self.bias = None
        if bias:
            self.bias = param(out_features, dtype=dtype, device=device)
            self.bias.weight_loader = self.weight.weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    """Linear whose output features are cut into contiguous ranges, one per rank."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: TPGroup,
                 dtype: torch.dtype, device=None, quant: QuantConfig | None = None):
        super().__init__()
        self.group = group
        self.out_start, self.out_end = shard_range(out_features, group.size, group.rank)
        local = self.out_end - self.out_start
        self._make_weight(local, in_features, dtype, device, quant, self.weight_loader, "a column-parallel linear")
        self.bias = None
        if bias:
            self.bias = param(local, dtype=dtype, device=device)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, src: TensorSource, shard_id=None) -> None:
        copy_into(param, src.read_rows(self.out_start, self.out_end), src.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x)


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel outputs fused into one matmul (gate_up_proj = [gate; up]).

    Each part is cut by the same rule, so rank r holds [gate_r; up_r].
    """

    def __init__(self, in_features: int, part_sizes: list[int], bias: bool, group: TPGroup,
                 dtype: torch.dtype, device=None, quant: QuantConfig | None = None):
        super().__init__()
        self.ranges = [shard_range(n, group.size, group.rank) for n in part_sizes]
        self.local_sizes = [e - s for s, e in self.ranges]
        self._make_weight(sum(self.local_sizes), in_features, dtype, device, quant, self.weight_loader,
                          "gate_up_proj")
        self.bias = None
        if bias:
            self.bias = param(sum(self.local_sizes), dtype=dtype, device=device)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, src: TensorSource, shard_id: int) -> None:
        offset = sum(self.local_sizes[:shard_id])
        start, end = self.ranges[shard_id]
        copy_into(param.narrow(0, offset, end - start), src.read_rows(start, end), f"{src.name}[{shard_id}]")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x)


class QKVParallelLinear(LinearBase):
    """Fused q/k/v projection cut by attention heads.

    Rank r holds its query heads and every KV head they read (a KV head shared by two ranks'
    query ranges is copied on both). Local layout: [q heads | k heads | v heads].
    Loads from separate q_proj/k_proj/v_proj (shard_id 'q'/'k'/'v') or from one fused tensor
    laid out [q; k; v] (shard_id None, GPT-2's c_attn).
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 shard: HeadShard, bias: bool, dtype: torch.dtype, device=None, quant: QuantConfig | None = None):
        super().__init__()
        self.shard, self.head_dim = shard, head_dim
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.q_size = shard.num_heads * head_dim
        self.kv_size = shard.num_kv_heads * head_dim
        out = self.q_size + 2 * self.kv_size
        self._make_weight(out, hidden_size, dtype, device, quant, self.weight_loader, "qkv_proj")
        self.bias = None
        if bias:
            self.bias = param(out, dtype=dtype, device=device)
            self.bias.weight_loader = self.weight_loader

    def _rows(self, shard_id: str) -> tuple[int, int, int]:
        """(local offset, checkpoint row start, checkpoint row end) for one of q, k, v."""
        d, s = self.head_dim, self.shard
        if shard_id == "q":
            return 0, s.q_start * d, s.q_end * d
        offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
        return offset, s.kv_start * d, s.kv_end * d

    def weight_loader(self, param: nn.Parameter, src: TensorSource, shard_id: str | None = None) -> None:
        if shard_id is None:  # fused [q; k; v] along the output dim
            q_rows, kv_rows = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            parts = {"q": src.narrow(0, 0, q_rows), "k": src.narrow(0, q_rows, kv_rows),
                     "v": src.narrow(0, q_rows + kv_rows, kv_rows)}
            for sid, part in parts.items():
                self.weight_loader(param, part, sid)
            return
        offset, start, end = self._rows(shard_id)
        copy_into(param.narrow(0, offset, end - start), src.read_rows(start, end), f"{src.name}[{shard_id}]")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = self._linear(x)
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class RowParallelLinear(LinearBase):
    """Linear whose input features are cut across ranks; partial sums meet in one all-reduce.

    `input_range` lets the input cut follow a non-uniform producer (o_proj's input is the
    attention heads, cut by head ranges times head_dim).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group: TPGroup,
                 dtype: torch.dtype, device=None, input_range: tuple[int, int] | None = None,
                 quant: QuantConfig | None = None, name: str = "a row-parallel linear"):
        super().__init__()
        self.group = group
        self.in_start, self.in_end = input_range or shard_range(in_features, group.size, group.rank)
        self._make_weight(out_features, self.in_end - self.in_start, dtype, device, quant, self.weight_loader, name,
                          in_range=(self.in_start, self.in_end))
        # Bias only on rank 0, or the all-reduce would add it tp_size times.
        self.bias = None
        if bias and group.rank == 0:
            self.bias = param(out_features, dtype=dtype, device=device)
            self.bias.weight_loader = lambda p, src, shard_id=None: copy_into(p, src.read(), src.name)

    def weight_loader(self, param: nn.Parameter, src: TensorSource, shard_id=None) -> None:
        copy_into(param, src.read_cols(self.in_start, self.in_end), src.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(self._linear(x))

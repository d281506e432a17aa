"""Megatron-style linear layers.

Column-parallel layers split the output dim and need no communication; row-parallel layers
split the input dim and end with one all-reduce. Column then row = one all-reduce per pair.
Weights are logical [out, in]; a checkpoint that stores [in, out] (GPT-2's Conv1D) is read
through a transposed view, so the same cut applies.

With a `QuantConfig` (workers/quantization.py) the column, merged, qkv and row layers hold
quantized codes instead: int8 codes [out, in] + `weight_scale` [out], or int4 codes + `weight_sz`
[out, in / group, 2], loaded by the same cut as the weight they replace (a row-parallel layer's
int8 scales are whole on every rank; its int4 groups are cut with its columns).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.parallel import HeadShard, TPGroup, shard_range
from workers.quantization import QuantConfig, check_int4_cut, int4_pack, quantized_linear
from workers.tensor_source import TensorSource, copy_into


# A few rows (batch-1 decode) make a matmul a GEMV. MKL runs F.linear's x @ W.T there at ~10 GB/s
# on this CPU, while a batched W @ x over 8 row-blocks of W streams the weight at 17-25 GB/s
# (2.2-2.9x faster at 1 row, 1.1-3.3x at 4 rows over SmolLM2's shapes, measured in
# docs/benchmarks.md, but for down_proj on one thread at 4 rows: 0.7x); at 8 rows it is mixed,
# and from ~12 rows F.linear is as fast or faster.
# float32 only: in bfloat16 F.linear is the faster of the two (13 against 8 GB/s).
GEMV_MAX_ROWS = 4
GEMV_BLOCKS = 8


def plain_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [T, in], faster for a few rows on CPU."""
    n = weight.shape[0]
    if x.dim() != 2 or x.shape[0] > GEMV_MAX_ROWS or n % GEMV_BLOCKS or x.device.type != "cpu" \
            or weight.dtype != torch.float32 or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    rows, k = x.shape
    y = torch.bmm(weight.view(GEMV_BLOCKS, n // GEMV_BLOCKS, k), x.t().unsqueeze(0).expand(GEMV_BLOCKS, k, rows))
    y = y.view(n, rows).t()  # [rows, n]; contiguous already when rows == 1
    if rows > 1:
        y = y.contiguous()
    return y if bias is None else y.add_(bias)


def _param(*shape: int, dtype: torch.dtype, device: torch.device | str | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class _Weighted(nn.Module):
    """The weight of a linear layer: plain, or quantized codes with their scales."""

    quant: QuantConfig | None = None

    def _make_weight(self, out_local: int, in_local: int, dtype, device, quant: QuantConfig | None,
                     loader, what: str, in_range: tuple[int, int] | None = None) -> None:
        """`in_range`: this rank's cut of the input (row-parallel), else the whole input."""
        self.quant = quant if quant is not None and quant.enabled else None
        q = self.quant
        if q is None:
            self.weight = _param(out_local, in_local, dtype=dtype, device=device)
        elif q.method == "int8":
            self.weight = _param(out_local, in_local, dtype=torch.int8, device=device)
            self.weight_scale = _param(out_local, dtype=torch.float32, device=device)
            # A row-parallel rank holds every output row: its scales are the whole vector.
            self.weight_scale.weight_loader = loader if in_range is None else \
                (lambda p, src, shard_id=None: copy_into(p, src.read(), src.name))
        else:
            start, end = in_range or (0, in_local)
            check_int4_cut(what, out_local, start, end, q.group_size)
            g = q.group_size
            self.weight = _param(out_local, in_local, dtype=torch.uint8, device=device)
            self.weight_sz = _param(out_local, in_local // g, 2, dtype=torch.float32, device=device)
            self.weight_sz.weight_loader = loader if in_range is None else \
                (lambda p, src, shard_id=None: copy_into(p, src.narrow(1, start // g, (end - start) // g).read(),
                                                          src.name))
        self.weight.weight_loader = loader

    def finish_loading(self) -> None:
        """int4: pack the codes for the kernel (a layout change, once, after loading). The plain
        codes stay too: a prefill chunk dequantizes from them (quantization.quantized_linear)."""
        if self.quant is not None and self.quant.method == "int4" and self.weight.device.type == "cpu":
            sz_t = self.weight_sz.data.transpose(0, 1).contiguous()  # [in / group, out, 2]
            self.weight_packed = nn.Parameter(int4_pack(self.weight.data), requires_grad=False)
            self.weight_sz_t = nn.Parameter(sz_t, requires_grad=False)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is None:
            return plain_linear(x, self.weight, self.bias)
        return quantized_linear(x, self)


class ReplicatedLinear(nn.Module):
    """A linear layer every rank holds whole (small projections)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype, device=device)
        self.weight.weight_loader = lambda p, src, shard_id=None: copy_into(p, src.read(), src.name)
        self.bias = None
        if bias:
            self.bias = _param(out_features, dtype=dtype, device=device)
            self.bias.weight_loader = self.weight.weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(_Weighted):
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
            self.bias = _param(local, dtype=dtype, device=device)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, src: TensorSource, shard_id=None) -> None:
        copy_into(param, src.read_rows(self.out_start, self.out_end), src.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x)


class MergedColumnParallelLinear(_Weighted):
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
            self.bias = _param(sum(self.local_sizes), dtype=dtype, device=device)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, src: TensorSource, shard_id: int) -> None:
        offset = sum(self.local_sizes[:shard_id])
        start, end = self.ranges[shard_id]
        copy_into(param.narrow(0, offset, end - start), src.read_rows(start, end), f"{src.name}[{shard_id}]")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x)


class QKVParallelLinear(_Weighted):
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
            self.bias = _param(out, dtype=dtype, device=device)
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


class RowParallelLinear(_Weighted):
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
            self.bias = _param(out_features, dtype=dtype, device=device)
            self.bias.weight_loader = lambda p, src, shard_id=None: copy_into(p, src.read(), src.name)

    def weight_loader(self, param: nn.Parameter, src: TensorSource, shard_id=None) -> None:
        copy_into(param, src.read_cols(self.in_start, self.in_end), src.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(self._linear(x))

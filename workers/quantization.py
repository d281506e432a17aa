"""Weight-only quantization of the linear layers, for memory-bound decode (Pope et al.'s int8
weights; gpt-fast's int8 and int4), on PyTorch's own CPU kernels.

- int8: per output channel, symmetric: w ~ codes x scale[out]; codes int8. The matmul is
  `aten._weight_int8pack_mm` (x @ codes^T x scale, dequantizing inside the kernel).
- w8a8: int8's weights and format, and activations quantized too, per row (per token) at each
  call, symmetric int8 (dynamic: no calibration). The matmul is int8 x int8 -> int32
  (`aten._int_mm`, `tpserve::w8a8_linear`): at 64 rows (decode of many sequences, where the
  weights are compute-bound, not read-bound) 1.5-1.9x faster than bf16 on this CPU, at a cost in
  quality (docs/benchmarks.md). Its checkpoint is int8's (the same codes and scales).
- int4: per group of `group_size` input columns, asymmetric: w ~ (codes - 8) x scale + zero, codes
  0..15; the matmul is `aten._weight_int4pack_mm_for_cpu` on codes packed at load by
  `aten._convert_weight_to_int4pack_for_cpu` (packing is a layout, not quantization), and at
  decode's few rows `tpserve::int4_gemv` on a layout of its own (below), which rounds the
  activations to int8 per group as it multiplies.

Why these kernels: they ship with the pinned torch, and fed bfloat16 activations (what they are
written for) they are the fastest matmuls here at decode's few rows. How a layer holds and calls
them, and when a prefill chunk dequantizes instead, is workers/layers/linear_method.py's part; this
file is the format and its arithmetic, and the quantized checkpoint in the cache.

Whole tensors are quantized once, from the checkpoint's (or the dequantized GGUF's) values, into a
safetensors folder in the cache (workers/quantized_checkpoint.py): a second start reads the codes
and does no quantization work. Ranks slice the codes and scales at load like any weight, so a rank's
numbers are the same slice of the same quantized tensor whatever the tp, and tokens do not depend
on tp beyond float summation order. Cuts: int8 splits anywhere (a scale is per output row). int4's
row-parallel cuts (along the input) must fall on group boundaries, and every rank's output rows
must be a multiple of 16 (the kernel's packing unit); a cut that cannot is refused at load with a
ConfigError naming the layer, the cut and the group size (no silent padding or fallback).

Only the Llama family's projections are quantized (q/k/v/o, gate/up/down); the embedding and the
LM head stay in the model's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.errors import ConfigError

QUANTIZATIONS = ("none", "int8", "w8a8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the CPU kernel takes
INT4_PACK_ROWS = 16  # output rows per packing unit of the CPU kernel
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, slots=True)
class QuantConfig:
    method: str = "none"
    group_size: int = 32  # int4 only

    def validate(self) -> "QuantConfig":
        if self.method not in QUANTIZATIONS:
            raise ConfigError("quantization", f"{self.method!r} is not one of {', '.join(QUANTIZATIONS)}")
        if self.method == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise ConfigError("quant_group_size", f"int4 groups of {self.group_size}: the CPU kernel takes "
                                                  f"{', '.join(map(str, INT4_GROUP_SIZES))}")
        return self

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def weights(self) -> "QuantConfig":
        """The format the weights are held in (and their quantized checkpoint's): w8a8 holds int8's."""
        return QuantConfig("int8") if self.method == "w8a8" else self

    @property
    def tag(self) -> str:
        return self.method if self.method != "int4" else f"int4-g{self.group_size}"


# ---- quantizing whole tensors -------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes int8 [out, in] and fp32 scales [out]: w ~ codes x scale."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale[:, None]


def fake_quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """w8a8's activations as its kernel sees them: each row rounded to int8 codes at its own
    symmetric scale (max |x| / 127) and back, in x's dtype (the reference for tpserve::w8a8_linear)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-12)
    return (torch.round(xf / scale).clamp(-127, 127) * scale).to(x.dtype)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes uint8 [out, in] (0..15) and scale_zero fp32 [out, in / group, 2]:
    w ~ (codes - 8) x scale + zero, per group of input columns."""
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ConfigError("quant_group_size", f"{in_f} input columns are not a multiple of groups of {group_size}")
    g = w.float().view(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    codes = torch.round((g - lo) / scale).clamp(0, 15).to(torch.uint8).view(out_f, in_f)
    zero = lo + 8 * scale
    return codes, torch.cat([scale, zero], dim=-1)


def dequantize_int4(codes: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
    out_f, in_f = codes.shape
    groups = scale_zero.shape[1]
    q = codes.float().view(out_f, groups, in_f // groups)
    return ((q - 8) * scale_zero[..., :1] + scale_zero[..., 1:]).view(out_f, in_f)


# ---- the CPU kernel's layout --------------------------------------------------------------------
def int4_pack(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 8)


# tpserve::int4_gemv's layout (workers/csrc/int4_gemv.cpp says why and how it reads it): blocks of 16
# output rows; per group of input columns, group / 8 vectors of 64 bytes of codes (vector j: byte
# 4 r + t = c[r, 8 j + t] | c[r, 8 j + 4 + t] << 4), then the 16 rows' s and z - 8 s in float16.
def int4_gemv_scales(scale_zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's (s, z - 8 s) [out, groups] in float16, as it multiplies them; a value past
    float16's range raises OverflowError (the caller keeps PyTorch's kernel)."""
    s, z = scale_zero[..., 0].float(), scale_zero[..., 1].float()
    s16, b16 = s.to(torch.float16), (z - 8 * s).to(torch.float16)
    if not (s16.isfinite().all() and b16.isfinite().all()):
        raise OverflowError("int4 scales past float16's range")
    return s16, b16


def int4_gemv_pack(codes: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [out, in] (0..15) and scale_zero [out, in / group, 2] -> the kernel's bytes."""
    out_f, in_f = codes.shape
    groups = scale_zero.shape[1]
    g = in_f // groups
    if out_f % INT4_PACK_ROWS or g % 8:
        raise ConfigError("quantization", f"int4: {out_f} x {in_f} in groups of {g} does not fit tpserve::int4_gemv")
    s16, b16 = int4_gemv_scales(scale_zero)
    c = codes.to(torch.uint8).view(out_f // 16, 16, groups, g // 8, 2, 4).permute(0, 2, 3, 1, 5, 4)
    nibbles = (c[..., 0] | (c[..., 1] << 4)).reshape(out_f // 16, groups, g * 8)
    scales = torch.stack([s16.view(out_f // 16, 16, groups), b16.view(out_f // 16, 16, groups)], dim=2)  # [B, 16, 2, G]
    scales = scales.permute(0, 3, 2, 1).contiguous().view(torch.uint8).view(out_f // 16, groups, 64)
    return torch.cat([nibbles, scales], dim=2).contiguous().view(-1)


def int4_gemv_unpack(packed: torch.Tensor, out_f: int, in_f: int, group_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's bytes back to codes uint8 [out, in] and its float16 s, z - 8 s [out, in / group]."""
    groups, blocks = in_f // group_size, out_f // INT4_PACK_ROWS
    b = packed.view(blocks, groups, group_size * 8 + 64)
    nib = b[..., :group_size * 8].reshape(blocks, groups, group_size // 8, 16, 4)
    c = torch.stack([nib & 15, nib >> 4], dim=-1)  # [block, group, j, r, t, half]
    codes = c.permute(0, 3, 1, 2, 5, 4).reshape(out_f, in_f)
    sb = b[..., group_size * 8:].contiguous().view(torch.float16).view(blocks, groups, 2, 16)
    s16, b16 = (sb[:, :, i].permute(0, 2, 1).reshape(out_f, groups) for i in (0, 1))
    return codes, s16, b16


def dequantize_int4_gemv(packed: torch.Tensor, out_f: int, in_f: int, group_size: int) -> torch.Tensor:
    """The float32 weight the kernel's bytes hold: codes x s + (z - 8 s), its float16 scales."""
    codes, s16, b16 = int4_gemv_unpack(packed, out_f, in_f, group_size)
    q = codes.float().view(out_f, in_f // group_size, group_size)
    return (q * s16.float()[..., None] + b16.float()[..., None]).view(out_f, in_f)


def int4_gemv_rows(packed: torch.Tensor, in_features: int, group_size: int) -> int:
    """Output rows in the kernel's bytes for this input width and group."""
    return packed.numel() // ((in_features // group_size) * (group_size * 8 + 64)) * INT4_PACK_ROWS


def int4_gemv_reference(x: torch.Tensor, codes: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
    """What tpserve::int4_gemv computes, in float64: x rounded to int8 per group (as w8a8 rounds a
    row), times the weights dequantized with the kernel's float16 (s, z - 8 s)."""
    out_f, in_f = codes.shape
    groups = scale_zero.shape[1]
    g = in_f // groups
    xg = x.float().view(x.shape[0], groups, g)  # rounded in float32, as the kernel rounds
    sx = (xg.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
    x_hat = (torch.round(xg / sx).clamp(-127, 127).double() * sx.double()).view(x.shape[0], in_f)
    s16, b16 = int4_gemv_scales(scale_zero)
    w = codes.double().view(out_f, groups, g) * s16.double()[..., None] + b16.double()[..., None]
    return x_hat @ w.view(out_f, in_f).T


def check_int4_cut(what: str, out_rows: int, in_start: int, in_end: int, group_size: int) -> None:
    """A rank's slice must be whole groups along the input and whole packing units of output rows."""
    if in_start % group_size or in_end % group_size:
        raise ConfigError("quantization", f"int4: {what}'s input cut [{in_start}, {in_end}) does not fall on groups "
                                          f"of {group_size}; pick a tp whose head or column cut does, a smaller "
                                          f"--quant-group-size, or int8")
    if out_rows % INT4_PACK_ROWS:
        raise ConfigError("quantization", f"int4: {what} holds {out_rows} output rows on this rank; the kernel packs "
                                          f"rows in units of {INT4_PACK_ROWS}; pick another tp, or int8")

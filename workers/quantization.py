"""Weight-only quantization of the linear layers, for memory-bound decode (Pope et al.'s int8
weights; gpt-fast's int8 and int4), on PyTorch's own CPU kernels.

- int8: per output channel, symmetric: w ~ codes x scale[out]; codes int8. The matmul is
  `aten._weight_int8pack_mm` (x @ codes^T x scale, dequantizing inside the kernel).
- int4: per group of `group_size` input columns, asymmetric: w ~ (codes - 8) x scale + zero, codes
  0..15; the matmul is `aten._weight_int4pack_mm_for_cpu` on codes packed at load by
  `aten._convert_weight_to_int4pack_for_cpu` (packing is a layout, not quantization).

Why these kernels: they ship with the pinned torch (torchao 0.18 is on PyPI but was not tried
against torch 2.13). Measured here they are 6-10x slower than MKL's float GEMV for one row
(docs/benchmarks.md), so on this CPU quantization saves memory, not time, until a faster kernel
comes; a prefill chunk (more than 16 rows) dequantizes and multiplies in float instead.

Whole tensors are quantized once, from the checkpoint's (or the dequantized GGUF's) values, into a
safetensors folder in the cache (`quantized_checkpoint`): a second start reads the codes and does
no quantization work. Ranks slice the codes and scales at load like any weight, so a rank's
numbers are the same slice of the same quantized tensor whatever the tp, and tokens do not depend
on tp beyond float summation order. Cuts: int8 splits anywhere (a scale is per output row). int4's
row-parallel cuts (along the input) must fall on group boundaries, and every rank's output rows
must be a multiple of 16 (the kernel's packing unit); a cut that cannot is refused at load with a
ConfigError naming the layer, the cut and the group size (no silent padding or fallback).

On CUDA every quantized matmul dequantizes the weight to the activations' dtype and multiplies:
the same numbers as the CPU kernels, the memory saved, but not yet the speed (`_weight_int4pack_mm`
and a fused int8 GEMV are not wired: no GPU was at hand to check their packing).

Only the Llama family's projections are quantized (q/k/v/o, gate/up/down); the embedding and the
LM head stay in the model's dtype.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.errors import ConfigError

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the CPU kernel takes
INT4_PACK_ROWS = 16  # output rows per packing unit of the CPU kernel
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MARKER = "tpserve_quantization.json"


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


# ---- the layer side --------------------------------------------------------------------------------
def int4_pack(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 8)


# Rows of x above which the weight is dequantized once and multiplied in float: the CPU kernels
# take ~1 ms per decode GEMV here but tens of ms for a 512-token prefill chunk, while dequantizing a
# projection costs about a millisecond.
DEQUANTIZE_ABOVE_ROWS = 16


def quantized_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """x @ W^T (+ bias) for a layer holding int8 codes + scales, or int4 codes (also packed) + scale_zero."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    if x2.shape[0] > DEQUANTIZE_ABOVE_ROWS or x2.is_cuda:
        # CUDA takes this path too: correct in any dtype, but not the fused kernels (see the docstring).
        w = dequantize_int8(layer.weight, layer.weight_scale) if layer.quant.method == "int8" \
            else dequantize_int4(layer.weight, layer.weight_sz)
        y = torch.nn.functional.linear(x2, w.to(x2.dtype))
    elif layer.quant.method == "int8":
        y = torch.ops.aten._weight_int8pack_mm(x2, layer.weight, layer.weight_scale)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, layer.weight_packed, layer.quant.group_size,
                                                       layer.weight_sz_t)
    if layer.bias is not None:
        y = y + layer.bias
    return y.view(*shape[:-1], y.shape[-1])


def check_int4_cut(what: str, out_rows: int, in_start: int, in_end: int, group_size: int) -> None:
    """A rank's slice must be whole groups along the input and whole packing units of output rows."""
    if in_start % group_size or in_end % group_size:
        raise ConfigError("quantization", f"int4: {what}'s input cut [{in_start}, {in_end}) does not fall on groups "
                                          f"of {group_size}; pick a tp whose head or column cut does, a smaller "
                                          f"--quant-group-size, or int8")
    if out_rows % INT4_PACK_ROWS:
        raise ConfigError("quantization", f"int4: {what} holds {out_rows} output rows on this rank; the kernel packs "
                                          f"rows in units of {INT4_PACK_ROWS}; pick another tp, or int8")


# ---- the quantized checkpoint in the cache -------------------------------------------------------
def _folder_key(folder: Path) -> str:
    h = hashlib.sha256(str(folder.resolve()).encode())
    for f in sorted(folder.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{folder.name}-{h.hexdigest()[:16]}"


def is_quantized(folder: str | Path) -> QuantConfig | None:
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return None
    d = json.loads(marker.read_text())
    return QuantConfig(d["method"], d.get("group_size", 32))


def quantized_checkpoint(folder: str | Path, quant: QuantConfig) -> Path:
    """<cache>/quantized/<folder>-<key>-<method>/: the folder's checkpoint with every Llama
    projection quantized (once; later calls return the folder)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from workers.model_source import cache_dir

    folder = Path(folder)
    out = cache_dir() / "quantized" / f"{_folder_key(folder)}-{quant.tag}"
    if (out / MARKER).is_file():
        return out
    log.info("quantizing %s to %s into %s (once)", folder, quant.tag, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".quantize-"))
    try:
        state: dict[str, torch.Tensor] = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    t = h.get_tensor(name)
                    parts = name.split(".")
                    if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in QUANTIZED:
                        if quant.method == "int8":
                            state[name], state[name + "_scale"] = quantize_int8(t)
                        else:
                            state[name], state[name + "_sz"] = quantize_int4(t, quant.group_size)
                    else:
                        state[name] = t.contiguous()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "quantization": quant.tag})
        for f in folder.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
                shutil.copy2(f, tmp / f.name)
        (tmp / MARKER).write_text(json.dumps({"method": quant.method, "group_size": quant.group_size,
                                              "source": str(folder)}))
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        try:
            os.rename(tmp, out)  # atomic: a concurrent rank or process may have won the race
        except OSError:
            if not (out / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

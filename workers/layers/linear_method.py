"""How a linear layer holds and multiplies its weight: plain, int8 or int4 (vLLM's LinearMethod).

The parallel layers (linear.py) decide which rows or columns a rank holds and how partial sums
meet; a method owns the format of what is held. It creates the layer's parameters (each with the
loader of the layer's cut), finishes them once after loading (packing, the kernels' scale dtype,
the kernel choice on this machine), and multiplies. A layer never reads another format's fields.

Kernels, chosen at start-up by workers/kernel_probe.py on the layer's own weights:
- plain: `F.linear`; on CPU, oneDNN on a copy of the weight packed once into its blocked layout
  (`onednn_linear`, what vLLM's CPU backend and inductor's freezing call: F.linear hands oneDNN
  the plain weight, which it reorders on every call), up to the row count where the probe finds it
  faster; and for up to 4 rows `tpserve::gemv` (workers/csrc/gemv.cpp: W streamed once, one row at
  a time per thread), which read SmolLM2's weights 1.8-2.8x faster than F.linear in float32 and
  2.0-2.5x in bfloat16 at one row on 2026-12-05's AVX-512 EPYC (`benchmarks.gemv`), probed against
  whichever of the two would serve those rows. Without a compiler, float32 keeps the older batched
  GEMV (W as 8 row-blocks times x: 2.2-2.9x MKL's GEMV on issue 12's machine, 2.4-4.8x slower on
  issue 20's). The probe picks per shape and thread count.
- int8 / int4 on CPU: PyTorch's weight-only kernels (`_weight_int8pack_mm`,
  `_weight_int4pack_mm_for_cpu`) fed bfloat16 activations. They are written for bf16: with
  float32 activations they ran 15-40x slower (issue 20's table) and were, in bf16, the fastest
  matmuls on that machine. A float32 model casts x to bf16 around the kernel and the result back
  (its residual stream, norms and attention stay float32). Above some row count (a prefill chunk)
  dequantizing the weight and calling F.linear in the activations' dtype wins: the probe finds it.
  int8 at up to 4 rows: `tpserve::gemv` on the codes where the probe times it faster (at one row,
  1.1-2.3x `_weight_int8pack_mm` on SmolLM2's shapes, 2026-12-05), in the activations' own dtype.
  int4 at a decode step's rows: `tpserve::int4_gemv` (workers/csrc/int4_gemv.cpp: int8-rounded
  activations times the 4-bit codes by VNNI dot products, llama.cpp's arithmetic) up to the row
  count (of 1-32) where the probe times it faster: SmolLM2's 120 int4 projections took 2.0 ms a
  token against PyTorch's kernel's 3.8 ms (streamed, 2026-12-06).
- w8a8 on CPU: `tpserve::w8a8_linear` (workers/csrc/w8a8.cpp): the rows quantized to int8 per
  row, `_int_mm`, scaled back, in one call; at up to 4 rows, where the probe times it faster,
  `tpserve::gemv` on the dequantized rows (the same products in float32, W read once).
- CUDA: every quantized matmul dequantizes to the activations' dtype and multiplies (the memory
  saved, not the speed: the CUDA int kernels are not wired; no GPU was at hand to check them).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from workers import cpu_kernels
from workers.kernel_probe import KernelProbe
from workers.layer_stack import DENSE, GEMV, INT4_GEMV, INT4_PACKED, INT8_PACKED, ONEDNN, W8A8, DecodeCall
from workers.quantization import (QuantConfig, check_int4_cut, dequantize_int4, dequantize_int8,
                                  dequantize_int4_gemv, fake_quantize_rows, int4_gemv_pack, int4_pack, quantize_int4,
                                  quantize_int8)
from workers.tensor_source import copy_into

GEMV_BLOCKS = 8
GEMV_PROBE_ROWS = (1, 2, 4)
# tpserve::int4_gemv takes any row count (past 4, tiles of 4 over each 16-row block read once): its
# probe goes on to a decode step of tens of sequences, as far as it beats PyTorch's int4 kernel.
INT4_GEMV_PROBE_ROWS = (1, 2, 4, 8, 16, 32)
# The GEMV probe times each path over copies of the weight adding up to this many bytes, past any
# last-level cache here: a model's step streams every weight from memory, and a single weight
# timed again and again stays cached, where the ranking differs (SmolLM2 at batch 1 on an AVX2
# EPYC: the cache-hot probe chose F.linear for qkv, o_proj and down_proj, and the step ran 8-10%
# slower than with the GEMV it rejected).
GEMV_PROBE_STREAM_BYTES = 128 << 20
GEMV_PROBE_MAX_COPIES = 64  # SmolLM2's smallest projection still streams ~85 MB; a tiny model's stays tiny
STREAMED_FULL_ROWS = 16  # up to this many rows a probe streams every copy; past it, proportionally fewer
# Row counts at which a quantized layer times its packed kernel against dequantize-and-multiply;
# the first count where the kernel loses ends the probe. Unprobed default: issue 20's crossing.
PACKED_PROBE_ROWS = (1, 4, 16, 32, 64, 128, 256)
PACKED_DEFAULT_ROWS = 32
# Row counts at which a float layer times oneDNN on its prepacked weight against F.linear; it
# serves every count up to the last one where it wins. The weight is packed for this many rows
# (oneDNN's blocking hint; the packed weight multiplies any row count).
ONEDNN_PROBE_ROWS = (4, 16, 64, 256)
ONEDNN_PACK_ROWS = 64


def param(*shape: int, dtype: torch.dtype, device=None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for x [rows, in] as a batched matmul over GEMV_BLOCKS row-blocks of the weight."""
    n, k = weight.shape
    rows = x.shape[0]
    y = torch.bmm(weight.view(GEMV_BLOCKS, n // GEMV_BLOCKS, k), x.t().unsqueeze(0).expand(GEMV_BLOCKS, k, rows))
    y = y.view(n, rows).t()  # [rows, n]; contiguous already when rows == 1
    return y.contiguous() if rows > 1 else y


class Streamed:
    """A probe's calls over a weight and copies of it adding up to GEMV_PROBE_STREAM_BYTES (at most
    GEMV_PROBE_MAX_COPIES): timed over all of them, a kernel reads its weight from memory, as in a
    model's step. The copies are made at the first call built, so only if the answer is not cached;
    `prepare` turns each into the kernel's own format (a packed copy per copy)."""

    def __init__(self, weight: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.weight, self.prepare, self.copies = weight, prepare, []

    def __call__(self, fn: Callable[[torch.Tensor], object], rows: int = 1) -> Callable[[], object]:
        """`fn` over the copies; past STREAMED_FULL_ROWS rows over proportionally fewer (at least
        2). A call's work grows with its rows while the weight it reads does not: with every copy at
        64 and 256 rows, SmolLM2's first start probed for 44 s in float32 and 23 s in bf16; with
        this, 28 s and 11 s, and the same choices within one probed row count (2026-12-05)."""
        if not self.copies:
            w = self.weight
            n = min(GEMV_PROBE_MAX_COPIES, -(-GEMV_PROBE_STREAM_BYTES // (w.numel() * w.element_size())))
            self.copies = [w] + [w.clone() for _ in range(n - 1)]
            if self.prepare is not None:
                self.copies = [self.prepare(c) for c in self.copies]
        copies = self.copies[:max(2, len(self.copies) * STREAMED_FULL_ROWS // max(rows, STREAMED_FULL_ROWS))]
        return lambda: [fn(c) for c in copies]

    def release(self) -> None:
        self.copies = []


def op_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (times scale per output row for int8 codes) by `tpserve::gemv`, 1 to 4 rows."""
    return torch.ops.tpserve.gemv(x, weight, scale)


def onednn_mode() -> str:
    """`TPSERVE_ONEDNN`: on (the default: the probe decides), always (every plain CPU layer
    multiplies on its packed weight, whatever the probe says), off (never packs)."""
    return os.environ.get("TPSERVE_ONEDNN", "on").lower()


def onednn_available(dtype: torch.dtype) -> bool:
    """oneDNN's linear on a prepacked weight runs here in `dtype` (bf16 needs the CPU's support)."""
    if onednn_mode() in ("off", "0", "false") or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight [out, in] reordered once into oneDNN's blocked layout (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, ONEDNN_PACK_ROWS)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias) by oneDNN on W packed by `onednn_pack`: the call inductor's freezing makes.
    F.linear hands oneDNN the plain weight, which it reorders on every call."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The activations' dtype inside the CPU int kernels: half types as they are, float32 as bf16."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def plain_methods(model: nn.Module) -> list["PlainLinear"]:
    """The PlainLinear method of every plain float layer of `model` (those holding a oneDNN copy)."""
    return [m.quant_method for m in model.modules() if isinstance(getattr(m, "quant_method", None), PlainLinear)]


class LinearMethod:
    """Creates, finishes and applies one layer's weight. One instance per layer."""

    def create_weights(self, layer: nn.Module, out_local: int, in_local: int, dtype: torch.dtype, device,
                       loader, what: str, in_range: tuple[int, int] | None = None) -> None:
        """`loader`: the layer's weight loader (its cut); `in_range`: this rank's cut of the input
        (row-parallel), else None (the whole input)."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module, probe: KernelProbe | None) -> None:
        pass

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] -> [rows, out], plus the layer's bias if it has one."""
        raise NotImplementedError

    def decode_call(self, layer: nn.Module, rows: int) -> DecodeCall | None:
        """The call `apply` makes on a CPU x of `rows` rows in the model's dtype, as the code
        `tpserve::llama_decode_layers` carries out (workers/csrc/decoder_layers.cpp); None where
        it has no such code (that step stays in Python)."""
        return None


class PlainLinear(LinearMethod):
    """A float weight [out, in] in the model's dtype; on CPU, where the probe picks them, also a
    oneDNN-packed copy (`onednn_weight`, up to `onednn_rows` rows) and the GEMV (up to `gemv_rows`)."""

    gemv_rows = 0  # F.linear until the probe says otherwise
    gemv = staticmethod(gemv)  # the probe's candidate: `tpserve::gemv` where it is built
    onednn_rows = 0
    onednn_weight: torch.Tensor | None = None  # the weight in oneDNN's layout, beside the plain one

    def create_weights(self, layer, out_local, in_local, dtype, device, loader, what, in_range=None):
        layer.weight = param(out_local, in_local, dtype=dtype, device=device)
        layer.weight.weight_loader = loader

    def process_weights_after_loading(self, layer, probe):
        w = layer.weight
        if probe is None or w.device.type != "cpu" or not w.is_contiguous() or w.dim() != 2:
            return
        streamed, packed_copies = Streamed(w), Streamed(w, onednn_pack)
        if onednn_available(w.dtype):
            # F.linear hands oneDNN the plain weight and it reorders it on every call. Packed once
            # (as vLLM's CPU backend and inductor's freezing do), SmolLM2's layers multiplied, with
            # weights streamed: bf16 64 rows 1.18-1.33x faster and 4 rows 1.45-1.85x; fp32 64 rows
            # 1.29-2.09x and 4 rows 2.18-3.69x (`benchmarks.onednn_linear`, 2026-12-05, AVX-512
            # EPYC). It costs a second copy of the weight: the plain one stays for the GEMV, the
            # row counts past the probe's, and a tied embedding.
            xp = {r: torch.randn(r, w.shape[1], dtype=w.dtype) for r in ONEDNN_PROBE_ROWS}
            self.onednn_rows = 1 << 30 if onednn_mode() == "always" else probe.rows_limit(
                "onednn-packed", tuple(w.shape), w.dtype, ONEDNN_PROBE_ROWS,
                candidate=lambda r: packed_copies(lambda c: onednn_linear(xp[r], c), r),
                incumbent=lambda r: streamed(lambda c: F.linear(xp[r], c), r), default=0)
            if self.onednn_rows:
                self.onednn_weight = onednn_pack(w.data)
        if cpu_kernels.takes(w.dtype):
            kernel, decision = op_gemv, f"gemv-op@{cpu_kernels.build_key()}"
        elif w.dtype == torch.float32 and w.shape[0] % GEMV_BLOCKS == 0:
            kernel, decision = gemv, "gemv-streamed"
        else:
            kernel = None
        if kernel is not None:
            # Against what serves those rows otherwise (the packed weight, or F.linear), both
            # reading their weights from memory.
            xs = {r: torch.randn(r, w.shape[1], dtype=w.dtype) for r in GEMV_PROBE_ROWS}
            if self.onednn_weight is not None:
                decision += "-vs-onednn"
                incumbent = lambda r: packed_copies(lambda c: onednn_linear(xs[r], c))  # noqa: E731
            else:
                incumbent = lambda r: streamed(lambda c: F.linear(xs[r], c))  # noqa: E731
            self.gemv_rows = probe.rows_limit(decision, tuple(w.shape), w.dtype, GEMV_PROBE_ROWS,
                                              candidate=lambda r: streamed(lambda c: kernel(xs[r], c)),
                                              incumbent=incumbent, default=0)
            self.gemv = kernel
        streamed.release()
        packed_copies.release()

    def unpack(self) -> None:
        """Back to F.linear above the GEMV's rows (the compiled step: inductor traces F.linear, not
        an opaque oneDNN tensor)."""
        self.onednn_weight, self.onednn_rows = None, 0

    def apply(self, layer, x):
        bias = getattr(layer, "bias", None)
        rows = x.shape[0]
        # An empty batch (a step whose rows sample nothing) takes F.linear: gemv needs rows.
        if 0 < rows <= self.gemv_rows and x.dtype == layer.weight.dtype:
            y = self.gemv(x, layer.weight)
            return y if bias is None else y.add_(bias)
        if 0 < rows <= self.onednn_rows and x.dtype == layer.weight.dtype:
            return onednn_linear(x, self.onednn_weight, bias)
        return F.linear(x, layer.weight, bias)

    def decode_call(self, layer, rows):
        bias = getattr(layer, "bias", None)
        if 0 < rows <= self.gemv_rows:
            return DecodeCall(GEMV, 0, layer.weight, None, bias) if self.gemv is op_gemv else None
        if 0 < rows <= self.onednn_rows:
            return DecodeCall(ONEDNN, 0, self.onednn_weight, None, bias)
        return DecodeCall(DENSE, 0, layer.weight, None, bias)


class _QuantizedLinear(LinearMethod):
    """Shared by int8 and int4: the packed kernel up to `packed_rows` rows on CPU, else dequantize."""

    decision = ""
    packed_rows = PACKED_DEFAULT_ROWS
    gemv_rows = 0  # rows up to which `gemv` serves (int8's tpserve::gemv, int4's tpserve::int4_gemv: the probe says)

    def __init__(self, quant: QuantConfig):
        self.quant = quant

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """A float weight [out, in] as this format's parameters, by name (the quantized
        checkpoint's tensors, and the LM head's, which is quantized at load)."""
        raise NotImplementedError

    def dequantize(self, layer, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def packed(self, layer, x: torch.Tensor) -> torch.Tensor:
        """The CPU kernel on x already in kernel_dtype."""
        raise NotImplementedError

    def prepare(self, layer, kd: torch.dtype) -> None:
        """The kernel's own copies (packing, scales in the kernel's dtype), once after loading."""
        raise NotImplementedError

    def gemv(self, layer, x: torch.Tensor) -> torch.Tensor:
        """A few rows of x in the activations' dtype, for formats that have a GEMV (int8)."""
        raise NotImplementedError

    def kernel_takes(self, in_features: int) -> bool:
        """Whether the packed CPU kernel is safe at this input width."""
        return True

    def process_weights_after_loading(self, layer, probe):
        if layer.weight.device.type != "cpu":
            return
        dtype, shape = layer.model_dtype, tuple(layer.weight.shape)
        kd = kernel_dtype(dtype)
        self.prepare(layer, kd)  # int4's drops the plain codes: the probe below times what serves
        k = shape[1]
        if not self.kernel_takes(k):
            self.packed_rows = 0  # a GEMV where one serves, else dequantize
            return
        if probe is None:
            return
        xs = {r: torch.randn(r, k, dtype=dtype) for r in PACKED_PROBE_ROWS}
        self.packed_rows = probe.rows_limit(
            self.decision, shape, dtype, PACKED_PROBE_ROWS,
            candidate=lambda r: lambda: self.packed(layer, xs[r].to(kd)).to(dtype),
            incumbent=lambda r: lambda: F.linear(xs[r], self.dequantize(layer, dtype)),
            default=PACKED_DEFAULT_ROWS)

    def apply(self, layer, x):
        if not x.is_cuda and 0 < x.shape[0] <= self.gemv_rows:
            y = self.gemv(layer, x)
        elif x.is_cuda or not 0 < x.shape[0] <= self.packed_rows:
            y = F.linear(x, self.dequantize(layer, x.dtype))
        else:
            y = self.packed(layer, x.to(kernel_dtype(x.dtype))).to(x.dtype)
        return y if layer.bias is None else y + layer.bias

    def decode_call(self, layer, rows):
        if 0 < rows <= self.gemv_rows:
            return DecodeCall(GEMV, 0, layer.weight, layer.weight_scale, layer.bias)
        if not 0 < rows <= self.packed_rows:
            return None  # dequantized into F.linear: a prefill's size, not a decode step's
        return self.packed_call(layer)

    def packed_call(self, layer) -> DecodeCall:
        """`packed` as a DecodeCall."""
        raise NotImplementedError


class Int8Linear(_QuantizedLinear):
    """int8 codes [out, in] + a float32 scale per output row (`weight_scale`); loaded, also the
    scales in the kernel's dtype (`weight_scale_k`)."""

    decision = "int8-packed"

    def create_weights(self, layer, out_local, in_local, dtype, device, loader, what, in_range=None):
        layer.weight = param(out_local, in_local, dtype=torch.int8, device=device)
        layer.weight.weight_loader = loader
        layer.weight_scale = param(out_local, dtype=torch.float32, device=device)
        # A row-parallel rank holds every output row: its scales are the whole vector.
        layer.weight_scale.weight_loader = loader if in_range is None else \
            (lambda p, src, shard_id=None: copy_into(p, src.read(), src.name))

    def quantize(self, w):
        codes, scale = quantize_int8(w)
        return {"weight": codes, "weight_scale": scale}

    def prepare(self, layer, kd):
        layer.weight_scale_k = nn.Parameter(layer.weight_scale.data.to(kd), requires_grad=False)

    def dequantize(self, layer, dtype):
        if dtype == torch.float32:
            return dequantize_int8(layer.weight, layer.weight_scale)
        return layer.weight.to(dtype) * layer.weight_scale.to(dtype)[:, None]

    def packed(self, layer, x):
        return torch.ops.aten._weight_int8pack_mm(x, layer.weight, layer.weight_scale_k)

    def kernel_takes(self, in_features):
        # torch 2.13's _weight_int8pack_mm reads past the rows of x and W when the input width is
        # not a multiple of 16: a segmentation fault at 2 rows of K = 72 or 100, and at one row of
        # a 251 x 72 head (a tiny test Llama, 2026-12-06); every K % 16 == 0 ran clean.
        return in_features % 16 == 0

    def packed_call(self, layer):
        return DecodeCall(INT8_PACKED, 0, layer.weight, layer.weight_scale_k, layer.bias)

    def gemv(self, layer, x):
        return op_gemv(x, layer.weight, layer.weight_scale)

    def process_weights_after_loading(self, layer, probe):
        super().process_weights_after_loading(layer, probe)
        if probe is None or layer.weight.device.type != "cpu" or not cpu_kernels.takes(layer.model_dtype):
            return
        kd = kernel_dtype(layer.model_dtype)
        if not self.kernel_takes(layer.weight.shape[1]):  # nothing else serves a few rows but a dequantize
            self.gemv_rows = max(GEMV_PROBE_ROWS)
            return
        # Against the kernel it replaces, both reading the codes from memory.
        self.gemv_rows = self.probe_gemv_rows(
            layer, probe, "int8-gemv", candidate=lambda x, c: op_gemv(x, c, layer.weight_scale),
            incumbent=lambda x, c: torch.ops.aten._weight_int8pack_mm(x.to(kd), c, layer.weight_scale_k).to(x.dtype))

    @staticmethod
    def probe_gemv_rows(layer, probe: KernelProbe, decision: str, candidate, incumbent) -> int:
        """Up to how many rows (of GEMV_PROBE_ROWS) `candidate(x, codes)` beats `incumbent(x, codes)`
        on this layer's int8 codes streamed from memory, x in the model's dtype."""
        dtype = layer.model_dtype
        xs = {r: torch.randn(r, layer.weight.shape[1], dtype=dtype) for r in GEMV_PROBE_ROWS}
        streamed = Streamed(layer.weight.data)
        try:
            return probe.rows_limit(f"{decision}@{cpu_kernels.build_key()}", tuple(layer.weight.shape), dtype,
                                    GEMV_PROBE_ROWS, candidate=lambda r: streamed(lambda c: candidate(xs[r], c)),
                                    incumbent=lambda r: streamed(lambda c: incumbent(xs[r], c)), default=0)
        finally:
            streamed.release()


class W8A8Linear(Int8Linear):
    """int8's weights (codes and a float32 scale per output row); activations quantized per row at
    each call. On CPU one `tpserve::w8a8_linear` call; elsewhere (CUDA, or no built kernels) the
    same arithmetic in PyTorch ops: the rows rounded to int8 and back, times the dequantized weight."""

    fused = False  # tpserve::w8a8_linear serves (CPU, kernels built)

    def process_weights_after_loading(self, layer, probe):
        # Nothing to prepare: the kernel takes the codes and float32 scales as loaded.
        self.fused = layer.weight.device.type == "cpu" and cpu_kernels.takes(layer.model_dtype)
        if probe is None or not self.fused:
            return
        op = torch.ops.tpserve.w8a8_linear
        self.gemv_rows = self.probe_gemv_rows(
            layer, probe, "w8a8-gemv", candidate=lambda x, c: op(x, c, layer.weight_scale, True),
            incumbent=lambda x, c: op(x, c, layer.weight_scale, False))

    def apply(self, layer, x):
        rows = x.shape[0]
        if self.fused and rows > 0 and not x.is_cuda:
            y = torch.ops.tpserve.w8a8_linear(x, layer.weight, layer.weight_scale, rows <= self.gemv_rows)
        else:
            y = F.linear(fake_quantize_rows(x), self.dequantize(layer, x.dtype))
        return y if layer.bias is None else y + layer.bias

    def decode_call(self, layer, rows):
        if not (self.fused and rows > 0):
            return None
        return DecodeCall(W8A8, int(rows <= self.gemv_rows), layer.weight, layer.weight_scale, layer.bias)


class Int4Linear(_QuantizedLinear):
    """int4 codes [out, in] (0..15, one per byte) + float32 (scale, zero) per group of input
    columns (`weight_sz` [out, in / group, 2]), as loaded. On CPU, once loaded, the layer holds
    three copies made from them instead:
    - PyTorch's packed codes (`weight_packed`) and its scales transposed, in the kernel's dtype
      (`weight_sz_t`), for `_weight_int4pack_mm_for_cpu` (up to `packed_rows` rows);
    - `tpserve::int4_gemv`'s bytes (`weight_gemv`: codes and float16 scales in one stream,
      workers/quantization.py), for a few rows (decode; up to `gemv_rows`, which the probe sets
      where that kernel beats PyTorch's on this machine: it needs AVX-512 VNNI);
    - and from the same bytes a prefill chunk past the packed rows dequantizes, so the plain codes
      and float32 scales (1.25 bytes a weight) are dropped: 1.25 bytes a weight in all.
    `tpserve::int4_gemv` rounds the activations to int8 per group, as llama.cpp's Q8 does, so the
    rows it serves see x rounded as w8a8 rounds it (per group, not per row). Scales past float16's
    range keep the plain codes and PyTorch's kernel."""

    # Against dequantizing from tpserve::int4_gemv's bytes (named apart from the plain codes' answers).
    decision = "int4-packed-vs-gemv-bytes"
    shape: tuple[int, int] = (0, 0)  # (out, in) on this rank, once the plain codes are dropped

    def create_weights(self, layer, out_local, in_local, dtype, device, loader, what, in_range=None):
        start, end = in_range or (0, in_local)
        g = self.quant.group_size
        check_int4_cut(what, out_local, start, end, g)
        layer.weight = param(out_local, in_local, dtype=torch.uint8, device=device)
        layer.weight.weight_loader = loader
        layer.weight_sz = param(out_local, in_local // g, 2, dtype=torch.float32, device=device)
        layer.weight_sz.weight_loader = loader if in_range is None else \
            (lambda p, src, shard_id=None: copy_into(p, src.narrow(1, start // g, (end - start) // g).read(), src.name))

    def quantize(self, w):
        codes, sz = quantize_int4(w, self.quant.group_size)
        return {"weight": codes, "weight_sz": sz}

    def prepare(self, layer, kd):
        layer.weight_packed = nn.Parameter(int4_pack(layer.weight.data), requires_grad=False)
        sz_t = layer.weight_sz.data.transpose(0, 1).contiguous().to(kd)  # [in / group, out, 2]
        layer.weight_sz_t = nn.Parameter(sz_t, requires_grad=False)
        try:
            layer.weight_gemv = nn.Parameter(int4_gemv_pack(layer.weight.data, layer.weight_sz.data),
                                             requires_grad=False)
        except OverflowError:  # scales past float16: the plain codes stay, and PyTorch's kernel
            layer.weight_gemv = None
            return
        self.shape = tuple(layer.weight.shape)
        layer.weight, layer.weight_sz = None, None  # what they held is in weight_gemv (see the class)

    def dequantize(self, layer, dtype):
        if layer.weight is not None:
            return dequantize_int4(layer.weight, layer.weight_sz).to(dtype)
        g = self.quant.group_size
        if cpu_kernels.takes(dtype):
            return torch.ops.tpserve.int4_gemv_dequantize(layer.weight_gemv, g, self.shape[1], dtype)
        return dequantize_int4_gemv(layer.weight_gemv, *self.shape, g).to(dtype)

    def packed(self, layer, x):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.weight_packed, self.quant.group_size,
                                                          layer.weight_sz_t)

    def packed_call(self, layer):
        return DecodeCall(INT4_PACKED, self.quant.group_size, layer.weight_packed, layer.weight_sz_t, layer.bias)

    def gemv(self, layer, x):
        return torch.ops.tpserve.int4_gemv(x, layer.weight_gemv, self.quant.group_size)

    def decode_call(self, layer, rows):
        if 0 < rows <= self.gemv_rows:
            return DecodeCall(INT4_GEMV, self.quant.group_size, layer.weight_gemv, None, layer.bias)
        return super().decode_call(layer, rows)

    def process_weights_after_loading(self, layer, probe):
        super().process_weights_after_loading(layer, probe)
        if getattr(layer, "weight_gemv", None) is None:
            return  # CUDA (dequantized into F.linear), or scales past float16
        if probe is not None and cpu_kernels.takes(layer.model_dtype) and torch.ops.tpserve.int4_gemv_fast():
            self.gemv_rows = self._probe_gemv_rows(layer, probe)

    def _probe_gemv_rows(self, layer, probe: KernelProbe) -> int:
        """tpserve::int4_gemv against the kernel it replaces, each reading its own bytes from memory."""
        g, kd, dtype = self.quant.group_size, kernel_dtype(layer.model_dtype), layer.model_dtype
        xs = {r: torch.randn(r, self.shape[1], dtype=dtype) for r in INT4_GEMV_PROBE_ROWS}
        ours, theirs = Streamed(layer.weight_gemv.data), Streamed(layer.weight_packed.data)
        op, sz_t = torch.ops.tpserve.int4_gemv, layer.weight_sz_t
        try:
            return probe.rows_limit(
                f"int4-gemv@{cpu_kernels.build_key()}", self.shape, dtype, INT4_GEMV_PROBE_ROWS,
                candidate=lambda r: ours(lambda c: op(xs[r], c, g), r),
                incumbent=lambda r: theirs(lambda c: torch.ops.aten._weight_int4pack_mm_for_cpu(
                    xs[r].to(kd), c, g, sz_t).to(dtype), r),
                default=0)
        finally:
            ours.release()
            theirs.release()


def linear_method(quant: QuantConfig | None) -> LinearMethod:
    if quant is None or not quant.enabled:
        return PlainLinear()
    return {"int8": Int8Linear, "w8a8": W8A8Linear}.get(quant.method, Int4Linear)(quant)

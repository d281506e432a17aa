"""tpserve::int4_gemv: int4 weights times activations rounded to int8 per group (batch-1 decode).
The kernel computes what its float64 reference does (x rounded per group in float32, the weights
dequantized with float16 scales) for both activation dtypes, every row count it takes and several
group sizes; it refuses bytes that are not its layout; an int4 layer serves its few rows through it
where it is chosen, and keeps PyTorch's kernel where its scales do not fit float16."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers import cpu_kernels
from workers.layers.linear import ColumnParallelLinear
from workers.layers.linear_method import Int4Linear
from workers.parallel import TPGroup
from workers.quantization import (QuantConfig, dequantize_int4, dequantize_int4_gemv, int4_gemv_pack,
                                  int4_gemv_reference, int4_gemv_rows, int4_gemv_scales, int4_gemv_unpack,
                                  quantize_int4)
from workers.tensor_source import TensorSource

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler: PyTorch's ops only here")


def _weights(n: int, k: int, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return quantize_int4(torch.randn(n, k, generator=g) * 0.05, group)


def _activations(rows: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-2, 1, rows)[:, None]
    x[0, :8] = 0  # part of a group at zero
    if rows > 1:
        x[1, k // 3] = 40.0  # an outlier: its group's other elements round to few codes
    if rows > 2:
        x[2, :] = 0  # a whole row at zero: every group at the scale's floor
    return x.to(dtype)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13])  # past 4: tiles of 4 rows, the last one short
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,group", [(48, 576, 32), (32, 256, 64), (16, 384, 128)])
def test_the_kernel_computes_the_rounded_activations_times_the_dequantized_weights(rows, dtype, n, k, group):
    codes, sz = _weights(n, k, group, seed=n + k)
    packed = int4_gemv_pack(codes, sz)
    assert int4_gemv_rows(packed, k, group) == n
    x = _activations(rows, k, dtype, seed=rows)
    got = torch.ops.tpserve.int4_gemv(x, packed, group)
    want = int4_gemv_reference(x, codes, sz)
    assert got.dtype == dtype and got.shape == (rows, n)
    # One activation code off by one moves an output by ~1e-4 of its scale: the tolerance is far below.
    scale = want.abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6 * scale)
    else:  # the float32 result rounded once to bf16
        torch.testing.assert_close(got.double(), want.to(dtype).double(), rtol=2 ** -8, atol=2e-6 * scale)
    # And close to the exact product on rows without the outlier (which flattens its group to a
    # few codes, by design): rounding x per group costs about a percent.
    exact = x.double() @ dequantize_int4(codes, sz).double().T
    plain = [r for r in range(rows) if r != 1]
    assert (got.double() - exact)[plain].norm() <= 0.02 * exact[plain].norm()


def test_the_kernels_bytes_unpack_to_the_codes_and_scales_they_were_made_from():
    codes, sz = _weights(48, 256, 64, seed=1)
    got_codes, s16, b16 = int4_gemv_unpack(int4_gemv_pack(codes, sz), 48, 256, 64)
    want_s, want_b = int4_gemv_scales(sz)
    assert torch.equal(got_codes, codes) and torch.equal(s16, want_s) and torch.equal(b16, want_b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,group", [(48, 576, 32), (16, 384, 128)])
def test_the_bytes_dequantize_in_cpp_as_the_reference_does(dtype, n, k, group):
    """A prefill chunk's weight (tpserve::int4_gemv_dequantize) is the Python unpacking's, to the
    one rounding a fused multiply-add saves."""
    codes, sz = _weights(n, k, group, seed=n)
    packed = int4_gemv_pack(codes, sz)
    got = torch.ops.tpserve.int4_gemv_dequantize(packed, group, k, dtype)
    want = dequantize_int4_gemv(packed, n, k, group)
    assert got.dtype == dtype and got.shape == (n, k)
    torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=1e-6 if dtype == torch.float32 else 2 ** -8,
                               atol=1e-7)
    with pytest.raises(RuntimeError, match="whole blocks"):
        torch.ops.tpserve.int4_gemv_dequantize(packed[:-64], group, k, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nan_in_a_row_makes_that_rows_outputs_nan_as_a_float_matmul_would(dtype):
    codes, sz = _weights(32, 128, 32, seed=2)
    x = torch.randn(2, 128).to(dtype)
    x[1, 70] = float("nan")
    y = torch.ops.tpserve.int4_gemv(x, int4_gemv_pack(codes, sz), 32)
    assert y[0].isfinite().all() and y[1].isnan().all()


def test_the_kernel_refuses_bytes_that_are_not_its_layout():
    codes, sz = _weights(32, 128, 32, seed=0)
    packed = int4_gemv_pack(codes, sz)
    x = torch.randn(1, 128)
    with pytest.raises(RuntimeError, match="whole blocks"):
        torch.ops.tpserve.int4_gemv(x, packed[:-1], 32)
    with pytest.raises(RuntimeError, match="whole blocks"):  # read with another group size
        torch.ops.tpserve.int4_gemv(x, packed, 64)
    with pytest.raises(RuntimeError, match="M >= 1"):
        torch.ops.tpserve.int4_gemv(torch.randn(0, 128), packed, 32)


def _int4_layer(w: torch.Tensor, group: int, probe=None) -> ColumnParallelLinear:
    layer = ColumnParallelLinear(w.shape[1], w.shape[0], bias=False, group=TPGroup(0, 1), dtype=torch.bfloat16,
                                 quant=QuantConfig("int4", group))
    for name, value in zip(("weight", "weight_sz"), quantize_int4(w, group)):
        p = getattr(layer, name)
        p.weight_loader(p, TensorSource.wrap(name, value))
    layer.finish_loading(probe)
    return layer


def test_an_int4_layer_serves_its_chosen_rows_through_the_kernel_and_the_rest_from_its_bytes():
    """Past its rows, PyTorch's packed kernel as before; past those, the weight dequantized from
    the kernel's bytes (the plain codes and float32 scales are dropped at load)."""
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    codes, sz = quantize_int4(w, 32)
    layer = _int4_layer(w, 32)
    method = layer.quant_method
    assert isinstance(method, Int4Linear) and layer.weight is None and layer.weight_sz is None
    method.gemv_rows, method.packed_rows = 4, 32
    for rows in (1, 4):
        x = torch.randn(rows, 256, dtype=torch.bfloat16)
        assert torch.equal(layer(x), torch.ops.tpserve.int4_gemv(x, layer.weight_gemv, 32))  # that kernel, no other
        want = int4_gemv_reference(x, codes, sz).to(torch.bfloat16)
        torch.testing.assert_close(layer(x), want, rtol=2 ** -8, atol=1e-3)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    want = torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.weight_packed, 32, layer.weight_sz_t)
    assert torch.equal(layer(x), want)
    x = torch.randn(33, 256)
    s16, b16 = int4_gemv_scales(sz)
    w16 = (codes.double().view(64, 8, 32) * s16.double()[..., None] + b16.double()[..., None]).view(64, 256)
    torch.testing.assert_close(layer(x).double(), x.double() @ w16.T, rtol=1e-5, atol=1e-5)
    method.gemv_rows = 0
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    want = torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.weight_packed, 32, layer.weight_sz_t)
    assert torch.equal(layer(x), want)


def test_scales_past_float16_keep_the_plain_codes_and_pytorchs_kernel_for_every_row_count():
    w = torch.randn(32, 64) * 0.05
    w[3, :32] = torch.linspace(-2e6, 2e6, 32)  # one group's scale past float16's 65504
    layer = _int4_layer(w, 32)
    assert layer.weight_gemv is None and layer.weight is not None and layer.quant_method.gemv_rows == 0
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    want = F.linear(x.float(), dequantize_int4(layer.weight.data, layer.weight_sz.data))
    torch.testing.assert_close(layer(x).float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_the_probe_times_the_kernel_against_pytorchs_and_records_both_choices(tmp_path):
    """A probed int4 layer records the packed kernel's limit (timed against dequantizing from the
    kernel's bytes) and, where the kernel is built with VNNI, its own rows against PyTorch's."""
    import json

    from workers.kernel_probe import KernelProbe

    layer = _int4_layer(torch.randn(64, 256) * 0.05, 32, KernelProbe(tmp_path / "k.json"))
    answers = json.loads((tmp_path / "k.json").read_text())
    method = layer.quant_method
    packed = [k for k in answers if k.startswith("int4-packed-vs-gemv-bytes|64x256|bfloat16")]
    assert len(packed) == 1 and answers[packed[0]] == method.packed_rows
    ours = [k for k in answers if k.startswith("int4-gemv@")]
    if torch.ops.tpserve.int4_gemv_fast():
        assert len(ours) == 1 and answers[ours[0]] == method.gemv_rows
    else:
        assert ours == [] and method.gemv_rows == 0

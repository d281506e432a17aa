"""`tpserve::gemv` (workers/csrc/gemv.cpp): the few-row matmul the probe may choose for plain and
int8 layers gives F.linear's result, for every weight format, row count and width (including
widths that are not a multiple of its 16-wide loads), and a layer that chose it still computes
its own format's matmul."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers import cpu_kernels
from workers.layers.linear import ColumnParallelLinear
from workers.layers.linear_method import Int8Linear, PlainLinear, op_gemv
from workers.parallel import TPGroup
from workers.quantization import QuantConfig, dequantize_int8, quantize_int8
from workers.tensor_source import TensorSource

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler: PyTorch's kernels only here")


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [64, 100, 576])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_gemv_equals_f_linear_on_the_same_weights(rows, k, weight_dtype, x_dtype):
    g = torch.Generator().manual_seed(rows * 1000 + k)
    w = torch.randn(37, k, generator=g)  # 37 output rows: not a multiple of any chunk
    x = torch.randn(rows, k, generator=g).to(x_dtype)
    if weight_dtype == torch.int8:
        codes, scale = quantize_int8(w)
        got, want = op_gemv(x, codes, scale), F.linear(x.float(), dequantize_int8(codes, scale))
    else:
        got, want = op_gemv(x, w.to(weight_dtype)), F.linear(x.float(), w.to(weight_dtype).float())
    assert got.dtype == x_dtype and got.shape == (rows, 37)
    tol = 1e-4 if x_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want if x_dtype == torch.float32 else want.to(x_dtype).float(),
                               rtol=tol, atol=tol * k ** 0.5)


def test_gemv_refuses_what_it_does_not_compute():
    w, x = torch.randn(8, 16), torch.randn(5, 16)
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        op_gemv(x, w)
    with pytest.raises(RuntimeError, match="its scales"):
        op_gemv(x[:1], w.to(torch.int8))


def _layer(quant: str | None) -> tuple[torch.Tensor, ColumnParallelLinear]:
    """A 96 -> 48 column-parallel layer at tp 1 loaded with a random weight (plain or int8 codes),
    its kernels not probed (PyTorch's until a test chooses the GEMV)."""
    w = torch.randn(48, 96)
    layer = ColumnParallelLinear(96, 48, bias=False, group=TPGroup(0, 1), dtype=torch.float32,
                                 quant=QuantConfig(quant) if quant else None)
    values = {"weight": w} if quant is None else dict(zip(("weight", "weight_scale"), quantize_int8(w)))
    for name, value in values.items():
        p = getattr(layer, name)
        p.weight_loader(p, TensorSource.wrap(name, value))
    layer.finish_loading(None)
    return w, layer


@pytest.mark.parametrize("quant", [None, "int8"])
@pytest.mark.parametrize("rows", [1, 4, 9])
def test_a_layer_that_chose_the_gemv_computes_its_own_matmul(quant, rows, monkeypatch):
    torch.manual_seed(rows)
    w, layer = _layer(quant)
    method = layer.quant_method
    assert isinstance(method, Int8Linear if quant else PlainLinear)
    calls = []

    def counted(*args):
        calls.append(args[0].shape[0])
        return op_gemv(*args)

    monkeypatch.setattr("workers.layers.linear_method.op_gemv", counted)
    method.gemv_rows = 4
    if quant is None:
        method.gemv = counted
    x = torch.randn(rows, 96)
    got = layer(x)
    # The GEMV keeps x in float32; int8's packed kernel (past 4 rows) rounds it to bf16 (~1e-2 off).
    ref = F.linear(x, w if quant is None else dequantize_int8(layer.weight, layer.weight_scale))
    tol = 1e-4 if quant is None or rows <= 4 else 5e-2
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    assert calls == ([rows] if rows <= 4 else [])


@pytest.mark.parametrize("quant", [None, "int8"])
def test_the_gemv_traces_into_a_compiled_graph_without_a_break(quant):
    """The compiled step traces through a layer that chose the GEMV (its fake registration gives
    the shape); fullgraph=True fails on any graph break."""
    torch.manual_seed(0)
    w, layer = _layer(quant)
    layer.quant_method.gemv_rows = 4
    if quant is None:
        layer.quant_method.gemv = op_gemv
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 96)
    torch.testing.assert_close(compiled(x), layer(x))

"""w8a8: int8 weights with activations quantized per row at each call. The kernel's activation
codes and scales are the reference's exactly; its matmul equals the reference arithmetic on both
of its paths (int32 `_int_mm` and the few-row GEMV), for float32 and bf16 and widths with tails;
a layer computes the same with and without the kernel; a model loads int8's checkpoint (no second
quantized copy), keeps its head in the model's dtype, and decodes close to int8's logits."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import folder_env
from workers import cpu_kernels
from workers.engine.sampling_params import SamplingParams
from workers.launcher import start_worker_group
from workers.layers.linear import ColumnParallelLinear
from workers.layers.linear_method import W8A8Linear
from workers.model_source import cache_dir
from workers.parallel import TPGroup
from workers.quantization import QuantConfig, dequantize_int8, fake_quantize_rows, quantize_int8
from workers.tensor_source import TensorSource
from workers.worker import WorkerSpec

kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler: PyTorch's ops only here")


@pytest.fixture(autouse=True, scope="module")
def private_cache(tmp_path_factory):
    """Quantized copies go to this module's own cache, so what it makes is this module's business."""
    yield from folder_env(tmp_path_factory, "TPSERVE_CACHE_DIR", "cache")


def _reference_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / 127).clamp(min=1e-12)
    return torch.round(xf / scale[:, None]).clamp(-127, 127), scale


@kernels
@pytest.mark.parametrize("k", [16, 100, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_quantizes_rows_as_the_reference_does(k, dtype):
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(9, k, generator=g) * torch.logspace(-3, 2, 9)[:, None]).to(dtype)
    x[3] = 0  # an all-zero row: the scale's floor, codes 0
    x[5, k // 2] = 1e4  # one outlier: every other element of its row rounds to a few codes
    q, s = torch.ops.tpserve.quantize_rows(x)
    want_q, want_s = _reference_codes(x)
    assert q.dtype == torch.int8 and torch.equal(q.float(), want_q)
    assert torch.equal(s, want_s)
    assert torch.equal(fake_quantize_rows(x).float(), (want_q * want_s[:, None]).to(dtype).float())


@kernels
def test_a_nan_in_a_row_makes_its_scale_nan_and_leaves_the_other_rows_alone():
    """Its codes would otherwise stand for a finite row (the maximum skips a NaN)."""
    x = torch.randn(3, 100)
    x[1, 50] = float("nan")
    q, s = torch.ops.tpserve.quantize_rows(x)
    want_q, want_s = _reference_codes(x[[0, 2]])
    assert s[1].isnan() and torch.equal(s[[0, 2]], want_s) and torch.equal(q[[0, 2]].float(), want_q)


@kernels
@pytest.mark.parametrize("rows", [1, 3, 5, 64])
@pytest.mark.parametrize("k", [100, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_linear_equals_the_integer_arithmetic(rows, k, dtype):
    g = torch.Generator().manual_seed(rows * 7 + k)
    w, x = torch.randn(67, k, generator=g), torch.randn(rows, k, generator=g).to(dtype)
    codes, scale = quantize_int8(w)
    q, s = _reference_codes(x)
    want = (q.double() @ codes.double().T) * s.double()[:, None] * scale.double()  # exact sums, then scales
    for gemv in ((False, True) if rows <= 4 else (False,)):
        got = torch.ops.tpserve.w8a8_linear(x, codes, scale, gemv)
        assert got.dtype == dtype and got.shape == (rows, 67)
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err < (1e-5 if dtype == torch.float32 else 4e-3), (gemv, err)


@kernels
def test_w8a8_linear_serves_inside_and_outside_inference_mode_either_first():
    """Its kept int32 buffer grows inside a served step (inference mode) and is written again by a
    probe or a test outside it; a kept tensor refused that ("Inplace update to inference tensor")."""
    g = torch.Generator().manual_seed(5)
    codes, scale = quantize_int8(torch.randn(4099, 96, generator=g))
    x = torch.randn(300, 96, generator=g).to(torch.bfloat16)  # a larger [M, N] than the other tests'
    with torch.inference_mode():
        inside = torch.ops.tpserve.w8a8_linear(x, codes, scale, False)
    outside = torch.ops.tpserve.w8a8_linear(x, codes, scale, False)
    assert torch.equal(inside, outside) and not outside.is_inference()


@pytest.mark.parametrize("fused", [False, True] if cpu_kernels.available() else [False])
def test_a_w8a8_layer_computes_the_fake_quantized_matmul(fused):
    torch.manual_seed(0)
    w, bias = torch.randn(48, 96), torch.randn(48)
    codes, scale = quantize_int8(w)
    layer = ColumnParallelLinear(96, 48, bias=True, group=TPGroup(0, 1), dtype=torch.float32,
                                 quant=QuantConfig("w8a8"))
    assert isinstance(layer.quant_method, W8A8Linear)
    for name, value in {"weight": codes, "weight_scale": scale, "bias": bias}.items():
        p = getattr(layer, name)
        p.weight_loader(p, TensorSource.wrap(name, value))
    layer.finish_loading(None)
    assert layer.quant_method.fused == cpu_kernels.available()  # on CPU the kernel serves where built
    layer.quant_method.fused = fused
    for rows in (1, 16):
        x = torch.randn(rows, 96)
        want = F.linear(fake_quantize_rows(x), dequantize_int8(codes, scale), bias)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)
        # and it is not the weight-only matmul: the activations' rounding shows
        assert (layer(x) - F.linear(x, dequantize_int8(codes, scale), bias)).abs().max() > 1e-5


def test_a_w8a8_model_reads_int8s_checkpoint_and_decodes_near_it(quant_llama_dir):
    cfg = json.loads((quant_llama_dir / "config.json").read_text())
    prompts = [[3, 5, 7, 9, 11, 13, 15], [20, 30, 40]]
    logits, outs = {}, {}
    for method in ("int8", "w8a8"):
        spec = WorkerSpec(str(quant_llama_dir), kv_cache_memory=8 << 20, quantization=method)
        with start_worker_group(spec) as group:
            if method == "int8":
                texts = [p + c.token_ids for p, c in zip(prompts, group.engine.generate(
                    prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)))]
            logits[method] = group.call("prefill_logits", texts).float()
            outs[method] = group.engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0,
                                                                         ignore_eos=True))
            report = group.reports[0]
            assert report["quantization"] == method
            assert report["lm_head"] == ("int8" if method == "int8" else "none")
    assert len(list((cache_dir() / "quantized").iterdir())) == 1  # one copy of the codes serves both
    assert all(len(c.token_ids) == 4 for c in outs["w8a8"])
    ref, got = logits["int8"], logits["w8a8"]
    assert got.shape == (sum(map(len, texts)), cfg["vocab_size"])
    err = (got - ref).abs().max() / ref.abs().max()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean()
    assert 0 < err < 0.1 and agree >= 0.8, (float(err), float(agree))

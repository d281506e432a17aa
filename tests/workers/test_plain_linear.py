"""plain_linear: the batched-GEMV formulation for a few rows gives F.linear's result, on the
shapes a step meets (1-2 rows take it; more rows, odd widths and strided weights fall back)."""
import pytest
import torch
import torch.nn.functional as F

from workers.layers.linear import GEMV_BLOCKS, GEMV_MAX_ROWS, plain_linear


@pytest.mark.parametrize("rows", [1, 2, GEMV_MAX_ROWS + 1, 17])
@pytest.mark.parametrize("out_features", [8 * GEMV_BLOCKS * 9, 8 * GEMV_BLOCKS * 9 + 3])
@pytest.mark.parametrize("bias", [False, True])
def test_plain_linear_equals_f_linear(rows, out_features, bias):
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, 96, generator=g)
    w = torch.randn(out_features, 96, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    got = plain_linear(x, w, b)
    assert got.shape == (rows, out_features) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_a_strided_weight_takes_f_linear():
    w = torch.randn(96, 64 * GEMV_BLOCKS).t()  # a transposed view: not contiguous
    x = torch.randn(1, 96)
    torch.testing.assert_close(plain_linear(x, w), F.linear(x, w))


def test_bfloat16_takes_f_linear_exactly():
    x, w = torch.randn(1, 96).bfloat16(), torch.randn(64 * GEMV_BLOCKS, 96).bfloat16()
    assert torch.equal(plain_linear(x, w), F.linear(x, w))

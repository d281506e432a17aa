"""The fused CPU ops (workers/csrc/fused_ops.cpp, workers/fused_ops.py) compute what the PyTorch
forms they replace compute: bit for bit where the arithmetic is the same (the residual add, rotary,
bf16 SiLU, the argmax), within float32's rounding where a sum is added in another order (the
norm's sum of squares, SiLU's exp); and a model's step runs them, with `TPSERVE_FUSED_OPS=off`
giving the same logits through PyTorch's ops."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers import cpu_kernels, fused_ops
from workers.layers.norm import RMSNorm
from workers.layers.rotary import RotaryEmbedding
from workers.worker import Worker, WorkerSpec

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler: PyTorch's ops only here")

DTYPES = [torch.float32, torch.bfloat16]


def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference in units of the dtype's spacing at b's magnitude."""
    step = torch.finfo(b.dtype).eps * b.float().abs().clamp_min(torch.finfo(b.dtype).tiny)
    return float(((a.float() - b.float()).abs() / step).max())


def _norm(width: int, dtype, seed: int) -> RMSNorm:
    norm = RMSNorm(width, 1e-5, dtype)
    norm.weight.data.copy_(torch.rand(width, generator=torch.Generator().manual_seed(seed)) + 0.5)
    return norm


@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_its_residual_add_match_the_reference(rows, dtype):
    g = torch.Generator().manual_seed(rows)
    norm = _norm(96, dtype, rows)
    x, residual = torch.randn(rows, 96, generator=g).to(dtype), torch.randn(rows, 96, generator=g).to(dtype)
    assert fused_ops.serves(x)
    y = norm(x)
    total, y2 = norm.add_forward(x, residual)
    assert torch.equal(total, residual + x)  # the sum rounds once, as `residual + x`
    for got, want in ((y, norm._reference(x)), (y2, norm._reference(residual + x))):
        assert got.dtype == dtype and got.shape == want.shape
        # Only the sum of squares is added in another order: a rounding step of bf16 at most, a few
        # of float32 (its rsqrt and two products carry the sum's last-bit difference).
        assert ulps(got, want) <= (1.0 if dtype == torch.bfloat16 else 4.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_equals_the_reference_exactly_on_views_of_the_qkv_output(dtype):
    t, heads, kv_heads, d = 11, 6, 2, 32
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    q = qkv[:, :heads * d].view(t, heads, d)  # strided: rows are qkv's
    k = qkv[:, heads * d:(heads + kv_heads) * d].view(t, kv_heads, d)
    rope = RotaryEmbedding(d, 4096, 10000.0, None)
    cos, sin = rope.cos_sin(torch.randint(0, 4096, (t,), generator=g))
    assert fused_ops.serves(q)
    got_q, got_k = RotaryEmbedding.rotate(q, k, cos, sin)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TPSERVE_FUSED_OPS", "off")
        assert not fused_ops.serves(q)
        want_q, want_k = RotaryEmbedding.rotate(q, k, cos, sin)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert got_q.is_contiguous()


@pytest.mark.parametrize("rows", [1, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_silu_of_the_gate_times_up(rows, dtype):
    g = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * 200, generator=g) * 6).to(dtype)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp's clamps and signed zero
    got = torch.ops.tpserve.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate) * up
    if dtype == torch.bfloat16:
        assert ulps(got, want) <= 1.0
        assert (got == want).float().mean() > 0.999  # rounding to bf16 hides exp's last bits
    else:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_picks_torch_argmax_with_its_ties_and_nans(dtype):
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(5)).to(dtype)
    logits[1, 10] = logits[1, 700] = 40.0  # a tie: the first index wins
    logits[2, 3] = float("nan")  # NaN counts as the largest
    logits[2, 9] = float("nan")
    logits[3] = float("-inf")
    logits[4, 999] = float("inf")
    got = fused_ops.greedy(logits)
    assert got.tolist() == logits.argmax(-1).tolist() == [int(logits[0].argmax()), 10, 3, 0, 999]


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_write_puts_each_row_in_its_slot_as_index_copy_does(dtype):
    nb, bs, kvh, d, t = 6, 4, 3, 16, 9
    g = torch.Generator().manual_seed(9)
    k_cache = torch.randn(nb, bs, kvh, d, generator=g).to(dtype)
    v_cache = torch.randn(nb, bs, kvh, d, generator=g).to(dtype)
    qkv = torch.randn(t, 5 * kvh * d, generator=g).to(dtype)
    k, v = torch.randn(t, kvh, d, generator=g).to(dtype), qkv[:, 2 * kvh * d:3 * kvh * d].view(t, kvh, d)
    slots = torch.randperm(nb * bs, generator=g)[:t]
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_k.view(nb * bs, kvh, d).index_copy_(0, slots, k)
    want_v.view(nb * bs, kvh, d).index_copy_(0, slots, v)
    torch.ops.tpserve.cache_write(k_cache, v_cache, slots, k, v)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.tpserve.cache_write(k_cache, v_cache, torch.full((t,), nb * bs), k, v)


FUSED = {"tpserve::rms_norm", "tpserve::add_rms_norm", "tpserve::rotary", "tpserve::silu_and_mul",
         "tpserve::cache_write"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_step_runs_the_fused_ops_and_pytorchs_ops_give_its_logits(tiny_llama_dir, monkeypatch, dtype):
    worker = Worker(WorkerSpec(str(tiny_llama_dir), tp_size=1, dtype=dtype, kv_cache_memory=4 << 20), 0)
    prompts = [[3, 5, 7, 9, 11, 13, 15], list(range(20, 61))]
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fused = worker.prefill_logits(prompts)
        assert FUSED <= {e.key for e in prof.key_averages()}
        monkeypatch.setenv("TPSERVE_FUSED_OPS", "off")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            plain = worker.prefill_logits(prompts)
        assert not FUSED & {e.key for e in prof.key_averages()}
    finally:
        worker.close()
    scale = plain.abs().max()
    assert scale > 0
    # float32: the norms' sums in another order; bf16: that, through 2 layers of bf16 rounding.
    tol = 1e-5 if dtype == "float32" else 3e-2
    assert float((fused - plain).abs().max() / scale) < tol

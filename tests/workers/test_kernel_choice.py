"""Kernel choices made on the running machine: each candidate computes F.linear's result, the probe
picks by timing and stops at the first loss, and its answers are cached per machine."""
import json
import logging
import time

import pytest
import torch
import torch.nn.functional as F

from workers.kernel_probe import KernelProbe
from workers.layers.linear import ColumnParallelLinear
from workers.layers.linear_method import GEMV_BLOCKS, PlainLinear, gemv, onednn_available, onednn_linear, onednn_pack
from workers.parallel import TPGroup
from workers.tensor_source import TensorSource


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_the_batched_gemv_equals_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 96, generator=g), torch.randn(8 * GEMV_BLOCKS * 9, 96, generator=g)
    got = gemv(x, w)
    assert got.shape == (rows, w.shape[0]) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gemv_rows", [0, 2])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_a_plain_layer_gives_f_linear_whichever_kernel_was_chosen(gemv_rows, rows):
    torch.manual_seed(rows)
    layer = ColumnParallelLinear(96, 8 * GEMV_BLOCKS * 3, bias=True, group=TPGroup(0, 1), dtype=torch.float32)
    w, b = torch.randn(8 * GEMV_BLOCKS * 3, 96), torch.randn(8 * GEMV_BLOCKS * 3)
    layer.weight.weight_loader(layer.weight, TensorSource.wrap("w", w))
    layer.bias.weight_loader(layer.bias, TensorSource.wrap("b", b))
    assert isinstance(layer.quant_method, PlainLinear)
    layer.quant_method.gemv_rows = gemv_rows
    x = torch.randn(rows, 96)
    torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)



@pytest.mark.skipif(not onednn_available(torch.float32), reason="no oneDNN in this torch build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 64, 65])
def test_a_plain_layer_on_its_onednn_packed_weight_gives_f_linear_up_to_its_rows(dtype, rows, monkeypatch):
    """The packed copy serves 1..onednn_rows rows (past them F.linear on the plain weight), with the
    bias, and gives F.linear's result in the layer's dtype."""
    if not onednn_available(dtype):
        pytest.skip(f"oneDNN has no {dtype} here")
    torch.manual_seed(rows)
    layer = ColumnParallelLinear(96, 40, bias=True, group=TPGroup(0, 1), dtype=dtype)
    w, b = torch.randn(40, 96), torch.randn(40)
    layer.weight.weight_loader(layer.weight, TensorSource.wrap("w", w))
    layer.bias.weight_loader(layer.bias, TensorSource.wrap("b", b))
    method = layer.quant_method
    method.onednn_weight, method.onednn_rows = onednn_pack(layer.weight.data), 64
    calls = []

    def counted(x, packed, bias=None):
        calls.append(x.shape[0])
        return onednn_linear(x, packed, bias)

    monkeypatch.setattr("workers.layers.linear_method.onednn_linear", counted)
    x = torch.randn(rows, 96).to(dtype)
    got = layer(x)
    assert got.dtype == dtype and calls == ([rows] if rows <= 64 else [])
    want = F.linear(x.float(), w.to(dtype).float(), b.to(dtype).float())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    method.unpack()  # as the compiled step does: F.linear from then on
    calls.clear()
    torch.testing.assert_close(layer(x).float(), want, rtol=tol, atol=tol)
    assert calls == [] and method.onednn_weight is None


@pytest.mark.skipif(not onednn_available(torch.float32), reason="no oneDNN in this torch build")
def test_the_probe_times_the_packed_weight_and_the_gemv_against_what_serves_otherwise(tmp_path):
    """A probed plain layer records the oneDNN decision, and the GEMV's against the packed weight
    where that won (its own decision name: an answer timed against F.linear is not reused)."""
    torch.manual_seed(0)
    layer = ColumnParallelLinear(96, 8 * GEMV_BLOCKS * 3, bias=False, group=TPGroup(0, 1), dtype=torch.float32)
    w = torch.randn(8 * GEMV_BLOCKS * 3, 96)
    layer.weight.weight_loader(layer.weight, TensorSource.wrap("w", w))
    probe = KernelProbe(tmp_path / "k.json")
    layer.finish_loading(probe)
    method = layer.quant_method
    answers = json.loads((tmp_path / "k.json").read_text())
    onednn = [k for k in answers if k.startswith("onednn-packed|")]
    assert len(onednn) == 1 and answers[onednn[0]] == method.onednn_rows
    assert (method.onednn_weight is not None) == (method.onednn_rows > 0)
    gemv_keys = [k for k in answers if k.startswith("gemv-")]
    assert len(gemv_keys) == 1 and ("-vs-onednn" in gemv_keys[0]) == (method.onednn_rows > 0)
    for rows in (1, 4, 64, 300):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(layer(x), F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_an_empty_batch_gives_an_empty_result_whatever_the_layer_holds(quant):
    """A step can select no rows for the LM head (nothing samples): 0 rows must not reach a kernel
    that needs rows (the batched GEMV views the weight by blocks; 251 rows do not divide into 8;
    int4 packs rows by 16, so it holds 256)."""
    from workers.quantization import QuantConfig, quantize_int4, quantize_int8
    torch.manual_seed(0)
    out = 256 if quant == "int4" else 251
    w = torch.randn(out, 64)
    q = QuantConfig(quant, 32) if quant else None
    layer = ColumnParallelLinear(64, out, bias=False, group=TPGroup(0, 1), dtype=torch.float32, quant=q)
    values = {"weight": w} if quant is None else \
        dict(zip(("weight", "weight_scale"), quantize_int8(w))) if quant == "int8" else \
        dict(zip(("weight", "weight_sz"), quantize_int4(w, 32)))
    for name, value in values.items():
        p = getattr(layer, name)
        p.weight_loader(p, TensorSource.wrap(name, value))
    layer.finish_loading(None)
    got = layer(torch.empty(0, 64))
    assert got.shape == (0, out)

def _fast():
    return lambda: None


def _slow():
    return lambda: time.sleep(0.003)


def _timing_lines(caplog) -> int:
    return sum("timing kernel choices" in r.getMessage() for r in caplog.records)


def test_the_probe_takes_the_candidate_up_to_its_first_loss_and_caches_the_answer(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="workers.kernel_probe")
    path = tmp_path / "kernels.json"
    probe = KernelProbe(path)
    # the candidate wins at 1 and 2 rows, loses at 4; 8 is never reached (or it would win again)
    limit = probe.rows_limit("test", (3, 5), torch.float32, (1, 2, 4, 8),
                             candidate=lambda r: _slow() if r == 4 else _fast(),
                             incumbent=lambda r: _fast() if r == 4 else _slow(), default=99)
    assert limit == 2 and probe.measured == 1
    assert _timing_lines(caplog) == 1  # a first start says why it takes longer
    assert json.loads(path.read_text()) == {f"test|3x5|float32|t{torch.get_num_threads()}": 2}

    def never(_):
        raise AssertionError("timed again")

    again = KernelProbe(path)  # a second start: the answer comes from the file, nothing is timed
    assert again.rows_limit("test", (3, 5), torch.float32, (1, 2, 4, 8), never, never, default=99) == 2
    assert again.measured == 0 and _timing_lines(caplog) == 1  # a warm cache says nothing
    # another shape is its own decision; the file keeps both
    assert again.rows_limit("test", (3, 6), torch.float32, (1,), lambda r: _slow(), lambda r: _fast(), 99) == 0
    assert len(json.loads(path.read_text())) == 2
    assert _timing_lines(caplog) == 2 and probe.rows_limit(  # once per process that times, not per choice
        "test", (3, 7), torch.float32, (1,), lambda r: _slow(), lambda r: _fast(), 99) == 0
    assert _timing_lines(caplog) == 2


def test_the_probe_switched_off_takes_the_default_and_times_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TPSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TPSERVE_KERNEL_PROBE", "off")
    probe = KernelProbe.for_this_machine()

    def never(_):
        raise AssertionError("timed")

    assert probe.rows_limit("test", (1,), torch.float32, (1,), never, never, default=7) == 7
    assert probe.measured == 0 and not probe.path.exists()


def test_a_burst_of_load_as_long_as_one_sides_timing_does_not_decide_the_probe(monkeypatch):
    """Two equal calls and a slow spell over the first 17 calls (the warm-ups and all three passes
    of whichever side is timed first, were the sides timed one after the other): interleaved, each
    side still gets a pass outside the spell, so neither looks 0.9x the other. The probe reads a
    clock that only the calls move (a real sleep overshoots under a loaded test run)."""
    import types

    import workers.kernel_probe
    from workers.kernel_probe import MARGIN, time_pair

    calls, now = [0], [0.0]
    monkeypatch.setattr(workers.kernel_probe, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def call():
        calls[0] += 1
        now[0] += 0.004 if calls[0] <= 17 else 0.001

    a, b = time_pair(call, call)
    assert calls[0] == 2 * (2 + 3 * 5)
    assert MARGIN * b < a and MARGIN * a < b


def test_a_streamed_probe_reads_every_copy_at_few_rows_and_fewer_past_them():
    """Up to STREAMED_FULL_ROWS rows every copy is read (the weight streams from memory); past them
    proportionally fewer, at least two (the compute dominates there, and the probe stays short)."""
    from workers.layers.linear_method import GEMV_PROBE_MAX_COPIES, STREAMED_FULL_ROWS, Streamed

    streamed = Streamed(torch.zeros(4, 4))  # tiny: the copy count is GEMV_PROBE_MAX_COPIES
    seen = []
    for rows in (1, STREAMED_FULL_ROWS, 4 * STREAMED_FULL_ROWS, 1 << 20):
        calls = []
        streamed(calls.append, rows)()
        seen.append(len(calls))
    assert seen == [GEMV_PROBE_MAX_COPIES, GEMV_PROBE_MAX_COPIES, GEMV_PROBE_MAX_COPIES // 4, 2]

"""Weight-only int8 / int4: the kernels against a dequantized matmul, tokens that do not depend on
tp, per-rank bytes equal to the quantized shard arithmetic, a cut the int4 kernel cannot take
refused by name, and a quantized checkpoint made once."""
from __future__ import annotations

import json

import pytest
import torch

import workers.quantized_checkpoint as quantized_checkpoint_module
from cluster.planner.model_shape import ModelShape
from tests.conftest import folder_env
from tests.workers.shard_bytes import llama_rank_bytes_quantized
from workers.config import ModelConfig
from workers.engine.sampling_params import SamplingParams
from workers.errors import ConfigError
from workers.launcher import start_worker_group
from workers.layers.linear import ColumnParallelLinear, RowParallelLinear
from workers.layers.linear_method import PACKED_DEFAULT_ROWS
from workers.models.llama import LlamaForCausalLM
from workers.parallel import TPGroup
from workers.quantization import (QuantConfig, dequantize_int4, dequantize_int4_gemv, dequantize_int8, int4_gemv_pack,
                                  quantize_int4, quantize_int8)
from workers.quantized_checkpoint import quantized_checkpoint
from workers.tensor_source import TensorSource
from workers.worker import WorkerSpec

PROMPTS = [[3, 5, 7, 9, 11, 13, 15], [20, 30, 40]]


@pytest.fixture(autouse=True, scope="module")
def private_cache(tmp_path_factory):
    """Quantized copies go to this module's own cache, so 'made once' is this module's business."""
    yield from folder_env(tmp_path_factory, "TPSERVE_CACHE_DIR", "cache")


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_equals_a_matmul_with_the_dequantized_weight(method, dtype):
    """Decode rows take the packed kernel in bf16 (a float32 model casts around it); a prefill
    chunk dequantizes into the model's dtype. Both equal x @ dequantized W^T, the kernel to bf16's
    precision with its scales in bf16, the dequantized int4 weight with its scales in float16."""
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    quant = QuantConfig(method, 32)
    if method == "int8":
        codes, scale = quantize_int8(w)
        ref, ref_k = dequantize_int8(codes, scale), dequantize_int8(codes, scale.bfloat16().float())
        ref_dq = ref
        extra = {"weight_scale": scale}
    else:
        codes, scale = quantize_int4(w, 32)
        ref, ref_k = dequantize_int4(codes, scale), dequantize_int4(codes, scale.bfloat16().float())
        # A prefill dequantizes from tpserve::int4_gemv's bytes: their float16 (s, z - 8 s).
        ref_dq = dequantize_int4_gemv(int4_gemv_pack(codes, scale), 96, 128, 32)
        extra = {"weight_sz": scale}
    layer = ColumnParallelLinear(128, 96, bias=True, group=TPGroup(0, 1), dtype=dtype, quant=quant)
    bias = torch.randn(96)
    for name, value in {"weight": codes, "bias": bias, **extra}.items():
        p = getattr(layer, name)
        p.weight_loader(p, TensorSource.wrap(name, value))
    layer.finish_loading(None)  # no probe: the packed kernel up to PACKED_DEFAULT_ROWS rows
    assert layer.quant_method.packed_rows == PACKED_DEFAULT_ROWS
    for rows in (5, PACKED_DEFAULT_ROWS + 8):
        x = torch.randn(rows, 128).to(dtype)
        y = layer(x)
        assert y.dtype == dtype
        if rows <= PACKED_DEFAULT_ROWS:  # the kernel: bf16 activations and scales, fp32 sums
            want, tol = x.bfloat16().float() @ ref_k.T + bias.to(dtype).float(), 1e-2
        else:
            want, tol = x.float() @ ref_dq.T + bias.to(dtype).float(), (1e-5 if dtype == torch.float32 else 2e-2)
        err = (y.float() - want).abs().max() / want.abs().max()
        assert err < tol, (rows, err)
    # and the quantization itself is close to the float weight: about 1% for int8, 10% for int4
    err = (ref - w).abs().mean() / w.abs().mean()
    assert err < (0.01 if method == "int8" else 0.1), err


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_logits_do_not_depend_on_tp_and_ranks_hold_their_quantized_slices(method, quant_llama_dir):
    """Every rank multiplies its slice of the same codes, so tp changes only rounding: bf16 partial
    sums meet in the all-reduce (a float32 model's kernels run in bf16). Scored on tp 1's own
    greedy text, the logits at tp 2 and 3 agree to a few bf16 steps (a wrong slice is off by
    the whole) and pick the same tokens at 90% of positions or more."""
    cfg = json.loads((quant_llama_dir / "config.json").read_text())
    logits = {}
    for tp in (1, 2, 3):
        spec = WorkerSpec(str(quant_llama_dir), tp_size=tp, kv_cache_memory=8 << 20, quantization=method)
        with start_worker_group(spec) as group:
            if tp == 1:
                texts = [p + c.token_ids for p, c in zip(PROMPTS, group.engine.generate(
                    PROMPTS, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)))]
            logits[tp] = group.call("prefill_logits", texts).float()
            # the planner's memory model holds what the largest rank holds, to int8's per-row
            # scales (6 bytes a row it leaves out: 3% of this model's 192 columns, 1% of SmolLM2's)
            planned = ModelShape(ModelConfig.from_pretrained(quant_llama_dir)).weight_bytes(tp, method, "float32")
            held = max(report["param_bytes"] for report in group.reports)
            assert abs(planned / held - 1) < 0.035, (tp, planned, held)
            for r, report in enumerate(group.reports):
                assert report["bytes_read"] == llama_rank_bytes_quantized(cfg, tp, r, method), (tp, r)
                assert report["param_bytes"] == llama_rank_bytes_quantized(cfg, tp, r, method, packed=True), (tp, r)
                assert report["quantization"] == QuantConfig(method).tag
                assert report["lm_head"] == "int8", (tp, r)
    ref = logits[1]
    for tp in (2, 3):
        err = (logits[tp] - ref).abs().max() / ref.abs().max()
        agree = (logits[tp].argmax(-1) == ref.argmax(-1)).float().mean()
        assert err < 5e-2 and agree >= 0.9, (tp, float(err), float(agree))


def test_int4_refuses_a_cut_the_kernel_cannot_take_and_names_the_layer(quant_llama_dir):
    cfg = ModelConfig.from_pretrained(quant_llama_dir)
    # tp 5 cuts the 384 MLP columns into 77 and 76: gate_up_proj's 154 rows are not whole packing
    # units of 16, and down_proj's 77 input columns not whole groups of 32.
    with pytest.raises(ConfigError) as e:
        LlamaForCausalLM(cfg, TPGroup(0, 5), torch.float32, "cpu", QuantConfig("int4", 32))
    assert e.value.field == "quantization" and "gate_up_proj" in e.value.message and "16" in e.value.message
    with pytest.raises(ConfigError) as e:
        RowParallelLinear(384, 192, False, TPGroup(1, 5), torch.float32, quant=QuantConfig("int4", 32),
                          name="down_proj")
    assert "down_proj" in e.value.message and "[77, 154)" in e.value.message and "groups of 32" in e.value.message
    # int8 cuts anywhere: the same tp builds
    for r in range(5):
        LlamaForCausalLM(cfg, TPGroup(r, 5), torch.float32, "cpu", QuantConfig("int8"))
    # and a row-parallel int8 rank holds every scale
    row = RowParallelLinear(384, 192, False, TPGroup(1, 5), torch.float32, quant=QuantConfig("int8"))
    assert tuple(row.weight.shape) == (192, 77) and tuple(row.weight_scale.shape) == (192,)


def test_a_quantized_checkpoint_is_made_once(quant_llama_dir, monkeypatch):
    first = quantized_checkpoint(quant_llama_dir, QuantConfig("int8"))
    assert (first / "tokenizer_config.json").exists() or (first / "config.json").exists()

    def no_work(*_):
        raise AssertionError("quantized again")

    monkeypatch.setattr(quantized_checkpoint_module, "quantized_tensors", no_work)
    assert quantized_checkpoint(quant_llama_dir, QuantConfig("int8")) == first
    # a quantized folder loaded without --quantization is refused, not read as floats
    from workers.worker import weights_folder

    with pytest.raises(ConfigError) as e:
        weights_folder(WorkerSpec(str(first)))
    assert e.value.field == "quantization" and "int8" in e.value.message


def test_the_quantized_checkpoint_is_written_in_shards_that_hold_the_same_tensors(quant_llama_dir, tmp_path,
                                                                                  monkeypatch):
    """The writer streams: it never queues much more than one shard, and the shards together hold
    exactly what one file would."""
    from safetensors import safe_open

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                out.update({name: h.get_tensor(name) for name in h.keys()})
        return out

    quant = QuantConfig("int4", 32)
    whole = quantized_checkpoint(quant_llama_dir, quant)
    monkeypatch.setenv("TPSERVE_CACHE_DIR", str(tmp_path))
    shard = 64 << 10
    sharded = quantized_checkpoint(quant_llama_dir, quant, shard_bytes=shard)
    assert sharded != whole and len(list(whole.glob("*.safetensors"))) == 1
    want, got = tensors(whole), tensors(sharded)
    assert len(list(sharded.glob("*.safetensors"))) > 3
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    largest = max(t.numel() * t.element_size() for t in want.values())
    marker = json.loads((sharded / quantized_checkpoint_module.MARKER).read_text())
    assert marker["peak_queued_bytes"] < shard + 2 * largest, marker


def test_int8_keeps_off_the_packed_kernel_where_its_input_width_would_crash_it(tiny_llama_dir):
    """PyTorch's int8 kernel reads out of bounds unless the input width is a multiple of 16 (the
    tiny Llama's 72 and 100 crashed the process at load). Those layers and the head take the GEMV
    or a dequantize instead, and a step's logits match the dequantized matmuls'."""
    from workers.layers.embedding import ParallelLMHead
    from workers.layers.linear_method import Int8Linear
    from workers.paged_cache import PagedSeq
    from workers.step_plan import PlanOp, StepPlan
    from workers.worker import Worker

    worker = Worker(WorkerSpec(str(tiny_llama_dir), tp_size=1, dtype="bfloat16", kv_cache_memory=4 << 20,
                               quantization="int8"), 0)
    try:
        layers = [m for m in worker.model.modules()
                  if isinstance(getattr(m, "quant_method", None), Int8Linear)]
        held = [m.quantized if isinstance(m, ParallelLMHead) else m for m in layers]
        assert {h.weight.shape[1] % 16 for h in held} != {0}  # the shapes this test is for
        for m in layers:
            assert m.quant_method.packed_rows == 0 or m.quant_method.kernel_takes(
                (m.quantized if isinstance(m, ParallelLMHead) else m).weight.shape[1])

        def step():
            seqs = [PagedSeq(0, 7, [0]), PagedSeq(0, 3, [1])]
            prefill = worker.execute(StepPlan(PlanOp.STEP, seqs, PROMPTS[0] + PROMPTS[1], [6, 9]))
            return torch.cat([prefill, worker.execute(StepPlan(PlanOp.STEP, [PagedSeq(7, 1, [0]), PagedSeq(3, 1, [1])],
                                                               [17, 18], [0, 1]))]).float()

        served = step()
        for m in layers:
            m.quant_method.gemv_rows = 0
        dequantized = step()
        assert served.abs().max() > 0
        assert (served - dequantized).abs().max() <= 0.02 * dequantized.abs().max()
    finally:
        worker.close()


@pytest.mark.parametrize("quantization", ["int8", "w8a8", "int4"])
def test_a_float16_model_quantized_on_cpu_keeps_pytorchs_kernels_and_gives_float32s_logits(
        quant_llama_dir, quantization, monkeypatch, tmp_path):
    """tpserve's CPU kernels take float32 and bfloat16 activations only. A float16 model's start-up
    probe of the int8 GEMV (its layers', or int4's and int8's LM head) and w8a8's first call raised
    "x is float32 or bfloat16": the replica could not start. It now keeps PyTorch's kernels, the
    probe on (a file of this test's own), and its logits follow the float32 model's (probe off:
    PyTorch's kernels too, fed bf16)."""
    from workers.kernel_probe import KernelProbe
    from workers.worker import Worker

    def logits(dtype: str) -> torch.Tensor:
        worker = Worker(WorkerSpec(str(quant_llama_dir), tp_size=1, dtype=dtype, kv_cache_memory=4 << 20,
                                   quantization=quantization), 0)
        try:
            return worker.prefill_logits(PROMPTS).float()
        finally:
            worker.close()

    full = logits("float32")
    with monkeypatch.context() as mp:
        mp.setattr(KernelProbe, "for_this_machine", classmethod(lambda cls: KernelProbe(tmp_path / "k.json")))
        half = logits("float16")
    assert torch.isfinite(half).all() and full.abs().max() > 0
    assert (half - full).abs().max() <= 0.03 * full.abs().max()

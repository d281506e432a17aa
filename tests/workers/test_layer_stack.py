"""The decode step's layers in one C++ call (workers/layer_stack.py) give the eager layers' logits
bit for bit, for every weight format and both CPU dtypes, and serve only the steps they can."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import folder_env
from workers import cpu_kernels
from workers.layer_stack import DENSE, GEMV, INT4_GEMV, INT4_PACKED, INT8_PACKED, ONEDNN, W8A8
from workers.layers.linear_method import onednn_available, onednn_pack
from workers.paged_cache import PagedSeq
from workers.step_plan import PlanOp, StepPlan
from workers.worker import Worker, WorkerSpec

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler: PyTorch's ops only here")

OP = "tpserve::llama_decode_layers"
BLOCK = 16


@pytest.fixture(autouse=True, scope="module")
def private_cache(tmp_path_factory):
    """Quantized copies and probe answers go to this module's own cache."""
    yield from folder_env(tmp_path_factory, "TPSERVE_CACHE_DIR", "cache")


def _run(worker: Worker, seqs: list[PagedSeq], ids: list[int], logits_rows: list[int], stacked: bool):
    """One step's logits, with the layer stack on or off, and whether its op ran."""
    worker.model.model.layer_stack.enabled = stacked
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        logits = worker.execute(StepPlan(PlanOp.STEP, seqs, ids, logits_rows))
    return logits, OP in {e.key for e in prof.key_averages()}


def _force(worker: Worker, choice: dict) -> None:
    """Every projection's kernel choice set as `choice` says (the probe's answers otherwise)."""
    for layer in worker.model.model.layers:
        for proj in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            for name, value in choice.items():
                if name == "onednn_weight":  # packed here whatever the probe chose
                    value = onednn_pack(proj.weight.data)
                setattr(proj.quant_method, name, value)
    worker.model.model.layer_stack._plans.clear()


# Per format: the probe's choices, then each kernel forced, so every code of the op is run
# whatever this machine's probe picks; and the (kind, arg) pairs the runs must have carried out.
CHOICES = {"none": [{}, {"gemv_rows": 0, "onednn_rows": 0}, {"gemv_rows": 4},
                    {"gemv_rows": 0, "onednn_rows": 1 << 30, "onednn_weight": True}],
           "int8": [{}, {"gemv_rows": 0}, {"gemv_rows": 4}],
           "int4": [{}, {"gemv_rows": 0}, {"gemv_rows": 4}],
           "w8a8": [{}, {"gemv_rows": 0}, {"gemv_rows": 4}]}
MUST_RUN = {"none": {(DENSE, 0), (GEMV, 0)}, "int8": {(GEMV, 0), (INT8_PACKED, 0)}, "int4": {(INT4_PACKED, 32), (INT4_GEMV, 32)},
            "w8a8": {(W8A8, 0), (W8A8, 1)}}


@pytest.mark.parametrize("quantization", ["none", "int8", "int4", "w8a8"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_stacked_decode_step_equals_the_eager_layers_bit_for_bit(quant_llama_dir, dtype, quantization):
    choices, must_run = CHOICES[quantization], set(MUST_RUN[quantization])
    if quantization == "none":
        if onednn_available(getattr(torch, dtype)):
            must_run.add((ONEDNN, 0))  # an opaque mkldnn tensor among the op's params
        else:
            choices = choices[:-1]
    worker = Worker(WorkerSpec(str(quant_llama_dir), tp_size=1, dtype=dtype, kv_cache_memory=4 << 20,
                               quantization=quantization), 0)
    try:
        carried = _stacked_equals_eager(worker, choices, getattr(torch, dtype))
    finally:
        worker.close()
    assert must_run <= carried, carried


@pytest.mark.parametrize("model", ["qwen2", "mistral"])
def test_biases_and_a_sliding_window_stay_bit_equal(request, model):
    """Qwen2's q/k/v biases ride in the op's bias slots; Mistral's window (16, here shorter than
    the 41-token prompt) reaches paged_decode."""
    folder = request.getfixturevalue(f"tiny_{model}_dir")
    worker = Worker(WorkerSpec(str(folder), tp_size=1, dtype="float32", kv_cache_memory=4 << 20), 0)
    try:
        _stacked_equals_eager(worker, CHOICES["none"][:3], torch.float32)
    finally:
        worker.close()


def _stacked_equals_eager(worker: Worker, choices: list[dict], dtype: torch.dtype) -> set:
    """Prefill three prompts, then decode steps (one row; three rows; a verify span beside a row)
    with the stack off and on under each kernel choice: bit-equal logits. Returns the (kind, arg)
    pairs the op carried out."""
    worker.cache.gather_up_to = 0  # every decoding row reads the cache in place (the op's attention)
    prompts = [[3, 5, 7, 9, 11, 13, 15, 17, 19, 21], list(range(20, 61)), [40, 41, 42]]
    tables = [[0], [1, 2, 3], [4]]
    seqs = [PagedSeq(0, len(p), t) for p, t in zip(prompts, tables)]
    ids = [i for p in prompts for i in p]
    _, ran = _run(worker, seqs, ids, [len(prompts[0]) - 1], stacked=True)
    assert not ran  # a prefill step stays in Python
    lens = [len(p) for p in prompts]
    steps = [([PagedSeq(lens[0], 1, tables[0])], [30]),
             ([PagedSeq(n, 1, t) for n, t in zip(lens, tables)], [31, 32, 33]),
             ([PagedSeq(lens[0], 1, tables[0]), PagedSeq(lens[1], 3, tables[1])], [34, 35, 36, 37])]
    carried = set()
    for choice in choices:
        _force(worker, choice)
        for step, new in steps:
            rows = list(range(len(new)))
            eager, ran_eager = _run(worker, step, new, rows, stacked=False)
            stacked, ran_stacked = _run(worker, step, new, rows, stacked=True)
            assert ran_stacked and not ran_eager
            assert stacked.dtype == eager.dtype == dtype and stacked.shape == eager.shape
            assert torch.equal(stacked, eager), (choice, float((stacked.float() - eager.float()).abs().max()))
            assert eager.float().abs().max() > 0
            kinds = worker.model.model.layer_stack._plans[len(new)][1]
            carried |= set(zip(kinds[0::2], kinds[1::2]))
    return carried


def test_a_step_the_op_cannot_carry_stays_in_python_with_the_same_result(quant_llama_dir):
    """int4 dequantized past its packed rows, and a gathered decode, run the eager layers."""
    worker = Worker(WorkerSpec(str(quant_llama_dir), tp_size=1, dtype="bfloat16", kv_cache_memory=4 << 20,
                               quantization="int4"), 0)
    try:
        worker.cache.gather_up_to = 0
        seqs = [PagedSeq(0, 5, [0]), PagedSeq(0, 5, [1])]
        worker.execute(StepPlan(PlanOp.STEP, seqs, [3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [4, 9]))
        step = [PagedSeq(5, 1, [0]), PagedSeq(5, 1, [1])]
        stacked, ran = _run(worker, step, [13, 14], [0, 1], stacked=True)
        assert ran
        methods = [layer.mlp.down_proj.quant_method for layer in worker.model.model.layers]
        saved = [m.packed_rows for m in methods]
        for m in methods:  # down_proj dequantizes at every row count now: no code for that
            m.packed_rows = 0
        worker.model.model.layer_stack._plans.clear()
        dequantized, ran = _run(worker, step, [13, 14], [0, 1], stacked=True)
        assert not ran
        assert (dequantized.float() - stacked.float()).abs().max() <= 0.05 * stacked.float().abs().max()
        for m, rows in zip(methods, saved):
            m.packed_rows = rows
        worker.model.model.layer_stack._plans.clear()
        worker.cache.gather_up_to = 1 << 30  # the gather path: padded SDPA, not the op's attention
        gathered, ran = _run(worker, step, [13, 14], [0, 1], stacked=True)
        assert not ran
        # Another attention kernel: close, not bit-equal.
        assert (gathered.float() - stacked.float()).abs().max() <= 0.05 * stacked.float().abs().max()
    finally:
        worker.close()


def test_the_switch_keeps_the_eager_layers(quant_llama_dir, monkeypatch):
    monkeypatch.setenv("TPSERVE_LAYER_STACK", "off")
    worker = Worker(WorkerSpec(str(quant_llama_dir), tp_size=1, dtype="float32", kv_cache_memory=4 << 20), 0)
    try:
        assert not worker.model.model.layer_stack.enabled
    finally:
        worker.close()


def test_at_tp2_the_op_runs_the_all_reduces_gives_the_eager_tokens_and_fails_fast_on_a_dead_peer(
        quant_llama_dir, monkeypatch):
    """tp 2 over the shared-memory collectives: the op sums o_proj's and down_proj's partial
    results itself (workers/csrc/shm_all_reduce.h), and greedy tokens and their logprobs equal the
    eager layers' (bf16, so the all-reduce's dtype is not float32). A rank that dies mid-step
    fails the step at once with the Python protocol's error, not after the collective timeout."""
    import signal
    import time

    import psutil

    from workers.engine.sampling_params import SamplingParams
    from workers.errors import WorkerError
    from workers.launcher import LocalWorkerGroup

    monkeypatch.setenv("TPSERVE_PAGED_DECODE", "always")  # the op's attention reads the cache in place
    prompts = [[3, 5, 7, 9, 11, 13, 15, 17, 19, 21], [40, 41, 42]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    outs, steps = {}, {}
    for mode in ("off", "on"):
        monkeypatch.setenv("TPSERVE_LAYER_STACK", mode)
        group = LocalWorkerGroup(WorkerSpec(str(quant_llama_dir), tp_size=2, dtype="bfloat16", quantization="int8",
                                            kv_cache_memory=4 << 20, collective_timeout_s=60))
        try:
            outs[mode] = group.engine.generate(prompts, params)
            steps[mode] = group.call("layer_stack_steps")
            if mode == "on":
                stream = iter(group.engine.add_request([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True)))
                next(stream), next(stream)  # past the prefill: decode steps, in the op, from here
                psutil.Process(group.pids[1]).send_signal(signal.SIGKILL)
                t0 = time.monotonic()
                with pytest.raises(WorkerError, match="exited"):
                    for _ in stream:
                        pass
                assert time.monotonic() - t0 < 10  # the timeout is 60 s
        finally:
            group.close()
    assert steps["off"] == 0 and steps["on"] >= 11
    for eager, stacked in zip(outs["off"], outs["on"]):
        assert len(stacked.token_ids) == 12
        assert stacked.token_ids == eager.token_ids and stacked.logprobs == eager.logprobs

"""Sharded models at tp 1-4 against transformers on the same weights (CPU, gloo, real processes).

One worker group per (model, tp) serves every test of that parameter (module-scoped fixtures).
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.workers.reference import reference_greedy, reference_logits, relative_error
from tests.workers.shard_bytes import gpt2_rank_bytes, llama_rank_bytes
from workers.engine.sampling_params import SamplingParams
from workers.launcher import start_worker_group
from workers.worker import WorkerSpec

TPS = [1, 2, 3, 4]
TOL = 1e-4
g = torch.Generator().manual_seed(1)
TINY_PROMPTS = [torch.randint(3, 251, (n,), generator=g).tolist() for n in (7, 13)]


def _group(folder, tp):
    return start_worker_group(WorkerSpec(str(folder), tp_size=tp, kv_cache_memory=32 << 20))


def greedy(group, prompts, n):
    done = group.engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    return [c.token_ids for c in done]


def _check_bytes(group, folder, rank_bytes):
    cfg = json.loads((folder / "config.json").read_text())
    tp = group.spec.tp_size
    full = (folder / "model.safetensors").stat().st_size
    for r, report in enumerate(group.reports):
        expected = rank_bytes(cfg, tp, r)
        assert report["param_bytes"] == expected, f"rank {r} holds {report['param_bytes']} bytes, rule says {expected}"
        assert report["bytes_read"] == expected, f"rank {r} read {report['bytes_read']} bytes, rule says {expected}"
        if tp > 1:
            assert report["bytes_read"] < 0.8 * full


# ---- tiny Llama: GQA, 9 heads / 3 KV heads, biases, llama3 rope scaling, untied head --------------
@pytest.fixture(scope="module", params=TPS, ids=lambda t: f"tp{t}")
def llama_group(request, tiny_llama_dir):
    with _group(tiny_llama_dir, request.param) as grp:
        yield grp


@pytest.fixture(scope="module")
def llama_ref(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()


def test_tiny_llama_logits_match_transformers(llama_group, llama_ref):
    ours = llama_group.call("prefill_logits", TINY_PROMPTS)
    assert relative_error(ours, reference_logits(llama_ref, TINY_PROMPTS)) < TOL


def test_tiny_llama_greedy_matches_transformers_generate(llama_group, llama_ref):
    ours = greedy(llama_group, TINY_PROMPTS, 16)
    assert ours == [reference_greedy(llama_ref, p, 16) for p in TINY_PROMPTS]


def test_tiny_llama_ranks_hold_and_read_only_their_slices(llama_group, tiny_llama_dir):
    _check_bytes(llama_group, tiny_llama_dir, llama_rank_bytes)


# ---- tiny GPT-2: fused c_attn, Conv1D, learned positions, biases on row-parallel layers -----------
@pytest.fixture(scope="module", params=TPS, ids=lambda t: f"tp{t}")
def gpt2_group(request, tiny_gpt2_dir):
    with _group(tiny_gpt2_dir, request.param) as grp:
        yield grp


@pytest.fixture(scope="module")
def gpt2_ref(tiny_gpt2_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir), dtype=torch.float32).eval()


def test_tiny_gpt2_logits_match_transformers(gpt2_group, gpt2_ref):
    ours = gpt2_group.call("prefill_logits", TINY_PROMPTS)
    assert relative_error(ours, reference_logits(gpt2_ref, TINY_PROMPTS)) < TOL


def test_tiny_gpt2_greedy_matches_transformers_generate(gpt2_group, gpt2_ref):
    ours = greedy(gpt2_group, TINY_PROMPTS, 16)
    assert ours == [reference_greedy(gpt2_ref, p, 16) for p in TINY_PROMPTS]


def test_tiny_gpt2_ranks_hold_and_read_only_their_slices(gpt2_group, tiny_gpt2_dir):
    _check_bytes(gpt2_group, tiny_gpt2_dir, gpt2_rank_bytes)


# ---- tiny Qwen2 (q/k/v biases, no o_proj bias) and Mistral (sliding window) ----------------------
# Each at tp 1, 2, 3 and its head count (7 and 5): no tp but the last divides the heads.
LONG_PROMPTS = [torch.randint(3, 251, (n,), generator=g).tolist() for n in (9, 37)]  # 37 > the window of 16


@pytest.fixture(scope="module", params=[1, 2, 3, 7], ids=lambda t: f"tp{t}")
def qwen2_group(request, tiny_qwen2_dir):
    with _group(tiny_qwen2_dir, request.param) as grp:
        yield grp


@pytest.fixture(scope="module", params=[1, 2, 3, 5], ids=lambda t: f"tp{t}")
def mistral_group(request, tiny_mistral_dir):
    with _group(tiny_mistral_dir, request.param) as grp:
        yield grp


def test_tiny_qwen2_loads_and_greedy_matches_transformers(qwen2_group, tiny_qwen2_dir):
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir), dtype=torch.float32).eval()
    assert ref.model.layers[0].self_attn.o_proj.bias is None and ref.model.layers[0].self_attn.q_proj.bias is not None
    ours = qwen2_group.call("prefill_logits", LONG_PROMPTS)
    assert relative_error(ours, reference_logits(ref, LONG_PROMPTS)) < TOL
    assert greedy(qwen2_group, LONG_PROMPTS, 16) == [reference_greedy(ref, p, 16) for p in LONG_PROMPTS]
    _check_bytes(qwen2_group, tiny_qwen2_dir, llama_rank_bytes)


def test_tiny_mistral_sliding_window_matches_transformers(mistral_group, tiny_mistral_dir):
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_mistral_dir), dtype=torch.float32).eval()
    # The window matters here: without it transformers itself gives other logits past position 16.
    full = reference_logits(ref, LONG_PROMPTS[1:])
    ref.config.sliding_window = None
    unwindowed = reference_logits(ref, LONG_PROMPTS[1:])
    ref.config.sliding_window = 16
    assert relative_error(unwindowed, full) > 100 * TOL
    ours = mistral_group.call("prefill_logits", LONG_PROMPTS)
    assert relative_error(ours, reference_logits(ref, LONG_PROMPTS)) < TOL
    # Decode past the window, in the paged cache, token by token.
    assert greedy(mistral_group, LONG_PROMPTS, 16) == [reference_greedy(ref, p, 16) for p in LONG_PROMPTS]
    _check_bytes(mistral_group, tiny_mistral_dir, llama_rank_bytes)


# ---- SmolLM2-135M (the real checkpoint, from GGUF) ------------------------------------------------
SMOL_TEXTS = ["The capital of France is", "def fibonacci(n):\n    "]


@pytest.fixture(scope="module")
def smol_prompts(smollm2_reference):
    _, tok = smollm2_reference
    return [tok(t).input_ids for t in SMOL_TEXTS]


@pytest.fixture(scope="module")
def smol_greedy_ref(smollm2_reference, smol_prompts):
    model, _ = smollm2_reference
    return [reference_greedy(model, p, 32) for p in smol_prompts]


@pytest.fixture(scope="module", params=TPS, ids=lambda t: f"tp{t}")
def smol_group(request, smollm2_dir):
    with _group(smollm2_dir, request.param) as grp:
        yield grp


def test_smollm2_logits_match_transformers(smol_group, smollm2_reference, smol_prompts):
    model, _ = smollm2_reference
    ours = smol_group.call("prefill_logits", smol_prompts)
    assert relative_error(ours, reference_logits(model, smol_prompts)) < TOL


def test_smollm2_greedy_32_tokens_match_transformers_generate(smol_group, smol_greedy_ref, smol_prompts):
    ours = greedy(smol_group, smol_prompts, 32)
    assert ours == smol_greedy_ref


def test_smollm2_ranks_hold_and_read_only_their_slices(smol_group, smollm2_dir):
    _check_bytes(smol_group, smollm2_dir, llama_rank_bytes)

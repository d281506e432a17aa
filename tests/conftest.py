"""Shared fixtures: tiny random models saved as HF folders, and the real SmolLM2 (converted once)."""
from __future__ import annotations

import os

from workers import set_openmp_env  # noqa: E402
set_openmp_env()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Clusters the tests start run eager, whatever the default (a compile per start would cost minutes);
# tests/workers/test_compiled_step.py tests the compiled step.
os.environ.setdefault("TPSERVE_COMPILE", "off")
# Kernel choices are timed on a quiet machine and cached for it (workers/kernel_probe.py); timed
# beside a test suite's other processes they came out wrong and stayed in the machine's cache
# (SmolLM2's qkv, o_proj and down_proj flipped from the GEMV to F.linear, a slower step). Tests
# take each decision's stated default; the probe's own tests use probes on files of their own.
os.environ.setdefault("TPSERVE_KERNEL_PROBE", "off")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.models import (make_quant_llama, make_tiny_gpt2, make_tiny_llama, make_tiny_mistral,  # noqa: E402
                          make_tiny_qwen2)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def sharp_llama_dir(tmp_path_factory):
    """The tiny Llama with spread-out logits: clear greedy margins over hundreds of positions."""
    return make_tiny_llama(tmp_path_factory.mktemp("sharp-llama"), logit_scale=8.0)


def folder_env(tmp_path_factory, var: str, name: str):
    """For a module-scoped fixture: `var` names a fresh folder of its own until the module ends."""
    mp = pytest.MonkeyPatch()
    mp.setenv(var, str(tmp_path_factory.mktemp(name)))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def quant_llama_dir(tmp_path_factory):
    """A tiny Llama whose cuts the int4 kernel takes at tp 1, 2 and 3 (tests.models)."""
    return make_quant_llama(tmp_path_factory.mktemp("quant-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory):
    return make_tiny_mistral(tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="session")
def smollm2_dir():
    from workers.model_source import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_dir):
    """transformers' own model and tokenizer on the same converted weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(smollm2_dir))

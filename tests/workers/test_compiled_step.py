"""The compiled step (workers/compiled_step.py) computes what the eager step does: the same greedy
tokens and logits within float tolerance, at tp 1 and across a tp 2 all-reduce (a graph break),
for a float model and an int8 one (whose kernels branch on the row count)."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import folder_env
from workers.engine.sampling_params import SamplingParams
from workers.launcher import start_worker_group
from workers.worker import WorkerSpec

PROMPTS = [[3, 5, 7, 9, 11, 13, 15], [20, 30, 40], list(range(40, 90))]


@pytest.fixture(autouse=True, scope="module")
def cold_inductor_cache(tmp_path_factory):
    """A cold compile, as on a fresh machine: ranks compile at their own pace, none times out."""
    yield from folder_env(tmp_path_factory, "TORCHINDUCTOR_CACHE_DIR", "inductor")


def _run(folder, tp: int, quantization: str, compiled: bool):
    spec = WorkerSpec(str(folder), tp_size=tp, kv_cache_memory=8 << 20, quantization=quantization, compile=compiled)
    with start_worker_group(spec) as group:
        assert all(r["compiled"] == compiled for r in group.reports)
        outs = group.engine.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        logits = group.call("prefill_logits", PROMPTS).float()
    return [o.token_ids for o in outs], logits


@pytest.mark.parametrize("tp,quantization", [(1, "none"), (2, "int8")])
def test_the_compiled_step_gives_the_eager_tokens_and_logits(quant_llama_dir, tp, quantization):
    eager_tokens, eager_logits = _run(quant_llama_dir, tp, quantization, False)
    tokens, logits = _run(quant_llama_dir, tp, quantization, True)
    assert tokens == eager_tokens
    err = (logits - eager_logits).abs().max() / eager_logits.abs().max()
    assert err < (1e-4 if quantization == "none" else 2e-2), float(err)
    assert not torch.equal(logits, torch.zeros_like(logits))

"""Named step regions (workers/trace.py) reach a profiler's trace while it records, and are no
profiler call at all while none does."""
from __future__ import annotations

import torch

from workers import trace
from workers.worker import Worker, WorkerSpec


def test_regions_are_recorded_under_a_profiler_and_skipped_without_one(tiny_llama_dir):
    assert trace.region("tpserve.attention") is trace._NOTHING  # no profiler: the shared null context
    worker = Worker(WorkerSpec(str(tiny_llama_dir), tp_size=1, kv_cache_memory=4 << 20), 0)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            assert trace.region("x") is not trace._NOTHING
            worker.prefill_logits([[3, 5, 7, 9]])
        attention = [e for e in prof.key_averages() if e.key == "tpserve.attention"]
        assert attention and attention[0].count == worker.config.num_layers  # one region per layer
    finally:
        worker.close()

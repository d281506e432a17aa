"""Named regions of a step for torch.profiler: attention, the collectives, sampling
(`benchmarks.throughput` splits a step's time by them).

A region is opened only while a profiler records: `torch.profiler.record_function` cost 6.1 us a
call with none recording (2026-12-06, this project's EPYC), and a token opens 30 to 90 of them
(one attention per layer, two all-reduces per layer at tp > 1).
"""
from __future__ import annotations

import contextlib

import torch

_NOTHING = contextlib.nullcontext()


def region(name: str):
    """`with region("tpserve.attention"):` names the work inside while a profiler records."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return _NOTHING

"""A compiled step: each Llama layer's regions around attention through torch.compile.

Issue 20's profile: beside ~7 ms of matmuls, a token spent more in ~1,300 small ops (norms,
rotary, residual adds, casts) at 5-10 us of Python dispatch each. Inductor fuses them into a few
C++ kernels per region. The regions are what lies between the paged attention calls, which stay
eager (they read block tables that change every step):

    before_attention: residual add -> input_layernorm -> qkv_proj -> rotary    (q, k, v, residual)
    after_attention:  o_proj -> residual add -> post_attention_layernorm -> MLP (MLP out, residual)

One compiled function per region serves every layer and every model in the process (the layer is
an argument: its weights are graph inputs), with the batch dimension dynamic, so a model compiles
a few graphs (one row; several rows; a prefill chunk past the int kernels' row limit), not one per
layer or batch size. A collective inside a region (tp > 1: o_proj's and down_proj's all-reduce)
is a graph break (`TPGroup._all_reduce` is excluded from compilation): the parts around it compile.

Warm-up compiles those shapes at load, each rank on its own (collectives local meanwhile), so no
request pays a compile. Inductor's cache lives in tpserve's cache folder: a second start
loads the compiled kernels instead of building them. CPU only: on CUDA the step stays eager
(CUDA graphs are issue 3's open GPU part; no GPU was at hand to check them).
"""
from __future__ import annotations

import logging
import os
import shutil
import time

import torch

from workers.layers.linear_method import plain_methods
from workers.models import llama
from workers.parallel import TPGroup

log = logging.getLogger(__name__)

_REGIONS: dict[str, object] = {}


def _regions():
    """The two compiled functions, made once per process."""
    if not _REGIONS:
        # The collective stays outside the graph (it is the shared-memory ring or gloo, nothing
        # inductor fuses). Applied here rather than as a decorator: see TPGroup._all_reduce.
        TPGroup._all_reduce = torch.compiler.disable(TPGroup._all_reduce)
        # Each kernel choice's row limit (GEMV up to 1-4 rows, a packed int kernel up to its probed
        # count) is a guard on the row count, so a quantized model's regions compile one graph per
        # bucket between those limits: past dynamo's default of 8 the rest ran eager (a 257-row
        # prefill chunk of SmolLM2 bf16 int8, 2026-12-05).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        _REGIONS["before"] = torch.compile(llama._before_attention, dynamic=True)
        _REGIONS["after"] = torch.compile(llama._after_attention, dynamic=True)
    return _REGIONS["before"], _REGIONS["after"]


def can_compile(model, device: torch.device) -> str | None:
    """None when the model's step compiles here; else why it stays eager."""
    if device.type != "cpu":
        return "the compiled step is CPU-only for now"
    if not isinstance(model, llama.LlamaForCausalLM):
        return f"{type(model).__name__} has no compiled regions (the Llama family has)"
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:  # e.g. the python:3.11-slim image of k8s/
        return f"no C++ compiler ({cxx}) on this machine: inductor's CPU backend builds its kernels with one"
    return None


def compile_model(model: llama.LlamaForCausalLM) -> None:
    before, after = _regions()
    for layer in model.model.layers:
        layer.before_attention, layer.after_attention = before, after
    # The regions trace F.linear: a oneDNN-packed weight is an opaque tensor dynamo cannot trace.
    for method in plain_methods(model):
        method.unpack()


def warm_up(model: llama.LlamaForCausalLM, rows: tuple[int, ...] = (1, 2, 64)) -> float:
    """Compiles each region at each row count a step takes (one decode row, several, a prefill
    chunk past the int kernels' row limit) on one layer with scratch inputs; returns the seconds.

    The group's collectives are local while it runs: ranks compile at their own pace (a cold
    compile takes longer than the collective timeout) and the graphs do not depend on the sums."""
    layer = model.model.layers[0]
    group = layer.mlp.down_proj.group
    attn = layer.self_attn
    dtype, dev = layer.input_layernorm.weight.dtype, layer.input_layernorm.weight.device
    t0 = time.perf_counter()
    group.local_only = True
    try:
        with torch.inference_mode():
            for n in rows:
                t = time.perf_counter()
                x = torch.randn(n, model.config.hidden_size, dtype=dtype, device=dev)
                cos_sin = model.model.rotary.cos_sin(torch.arange(n, device=dev))
                for residual in (None, x):  # the first layer has none
                    layer.before_attention(layer, x, residual, *cos_sin)
                o = torch.randn(n, attn.num_heads * attn.head_dim, dtype=dtype, device=dev)
                layer.after_attention(layer, o, x)
                log.info("compiled step: %d rows ready in %.1f s", n, time.perf_counter() - t)
    finally:
        group.local_only = False
    return time.perf_counter() - t0

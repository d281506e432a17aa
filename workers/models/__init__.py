"""Model definitions built from the parallel layers, and the registry that picks one."""
from __future__ import annotations

import torch

from workers.config import SUPPORTED_MODEL_TYPES, ModelConfig
from workers.errors import UnsupportedArchitectureError
from workers.parallel import TPGroup


def build_model(config: ModelConfig, group: TPGroup, dtype: torch.dtype, device: torch.device | str,
                quant=None):
    """This rank's shard of the model, parameters allocated but not loaded. `quant`: a
    QuantConfig for the Llama family's projections (workers/quantization.py)."""
    if config.is_llama_family:
        from workers.models.llama import LlamaForCausalLM
        return LlamaForCausalLM(config, group, dtype, device, quant)
    if quant is not None and quant.enabled:
        raise UnsupportedArchitectureError(f"--quantization {quant.method}: only the Llama family "
                                           f"(llama, mistral, qwen2) is quantized; {config.model_type} is not")
    if config.model_type == "gpt2":
        from workers.models.gpt2 import GPT2LMHeadModel
        return GPT2LMHeadModel(config, group, dtype, device)
    raise UnsupportedArchitectureError(
        f"model_type {config.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")

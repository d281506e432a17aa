"""Model definitions built from the parallel layers, and the registry that picks one."""
from __future__ import annotations

import torch

from workers.config import SUPPORTED_MODEL_TYPES, ModelConfig
from workers.errors import UnsupportedArchitectureError
from workers.parallel import TPGroup


def build_model(config: ModelConfig, group: TPGroup, dtype: torch.dtype, device: torch.device | str):
    """This rank's shard of the model, parameters allocated but not loaded."""
    if config.is_llama_family:
        from workers.models.llama import LlamaForCausalLM
        return LlamaForCausalLM(config, group, dtype, device)
    if config.model_type == "gpt2":
        from workers.models.gpt2 import GPT2LMHeadModel
        return GPT2LMHeadModel(config, group, dtype, device)
    raise UnsupportedArchitectureError(
        f"model_type {config.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")

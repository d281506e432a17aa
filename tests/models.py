"""Tiny random-weight checkpoints built with transformers and saved like any HF model.

Init std is 0.2 so logits are far from flat and greedy comparisons are not decided by ties.
Head counts are chosen so tp 2, 3 and 4 all cut unevenly.
"""
from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_llama(folder: Path, tie: bool = False, seed: int = 0, logit_scale: float = 1.0) -> Path:
    """logit_scale > 1 spreads the logits, so top-2 gaps stay clear of near-ties over many positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=251, hidden_size=72, intermediate_size=100, num_hidden_layers=2,
        num_attention_heads=9, num_key_value_heads=3, head_dim=8, max_position_embeddings=256,
        rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=tie,
        attention_bias=True, mlp_bias=True, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms and biases away from their 1/0 init, so a slicing bug shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
        model.lm_head.weight.mul_(logit_scale)
    model.save_pretrained(folder)
    return Path(folder)


def _perturb_and_save(model, folder: Path, logit_scale: float = 1.0) -> Path:
    with torch.no_grad():  # norms and biases away from their 1/0 init, so a slicing bug shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
        if not model.config.tie_word_embeddings:
            model.lm_head.weight.mul_(logit_scale)
    model.save_pretrained(folder)
    return Path(folder)


def make_tiny_qwen2(folder: Path, seed: int = 0) -> Path:
    """Qwen2's shape: q/k/v biases but none on o_proj, tied embeddings, a large rope theta, and
    7 query heads over 1 KV head (tp 2 and 3 cut unevenly; tp 7 gives each rank one head)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=251, hidden_size=56, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=7, num_key_value_heads=1, max_position_embeddings=256,
                      rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=True, rope_theta=1e6,
                      use_sliding_window=False, sliding_window=32, bos_token_id=1, eos_token_id=2)
    return _perturb_and_save(Qwen2ForCausalLM(cfg).eval(), folder)


def make_tiny_mistral(folder: Path, seed: int = 0, sliding_window: int = 16) -> Path:
    """Mistral's shape: no biases, an explicit head_dim, and a sliding window short enough that
    the test prompts and their continuations run past it; 5 query heads over 5 KV heads."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=251, hidden_size=40, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=5, num_key_value_heads=5, head_dim=12, max_position_embeddings=256,
                        rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=False,
                        sliding_window=sliding_window, bos_token_id=1, eos_token_id=2)
    return _perturb_and_save(MistralForCausalLM(cfg).eval(), folder, logit_scale=4.0)


def make_tiny_gpt2(folder: Path, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=251, n_embd=48, n_layer=2, n_head=6, n_positions=128, initializer_range=0.2,
                     bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return Path(folder)


def make_tiny_llama_with_tokenizer(folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random Llama over SmolLM2's real tokenizer: servable through the text APIs, fast to load."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(tokenizer_dir) / name).exists():
            shutil.copy(Path(tokenizer_dir) / name, Path(folder) / name)
    return Path(folder)


def make_quant_llama(folder: Path, seed: int = 0) -> Path:
    """A tiny Llama whose projections the int4 CPU kernel can take at tp 1, 2 and 3: every rank's
    output rows a multiple of 16, its input cut a multiple of 32 (6 heads of 32, 3 KV heads,
    intermediate 384). Logits spread (x4) so greedy tokens are not decided by near-ties."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=192, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=3, head_dim=32, max_position_embeddings=256,
                      rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    model.save_pretrained(folder)
    return Path(folder)

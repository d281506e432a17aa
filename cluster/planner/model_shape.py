"""What the planner needs of a model: per-rank weight elements and bytes, KV bytes per token,
FLOPs, from a config alone (`--model` may be a folder, a GGUF, a built-in name or a config.json).
The cut is the engine's own (workers.parallel): the largest rank sets the pace and the memory."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from workers.config import ModelConfig
from workers.errors import ConfigError
from workers.parallel import head_shard, split_sizes

# Bytes per weight element as stored on a rank (what memory holds) and as a decode step reads it.
# int4 on CPU holds PyTorch's packed codes (0.5) with their bf16 (scale, zero) per group of 32 (the
# default: 4 / 32), and tpserve::int4_gemv's codes (0.5) with float16 scales (4 / 32), from which a
# prefill dequantizes (workers/layers/linear_method.py's Int4Linear); elsewhere the plain codes (1)
# and float32 (scale, zero) (8 / 32): 1.25 either way.
# w8a8 holds int8's codes (its activations are quantized at each call, nothing more is kept).
HELD_BYTES = {"none": None, "int8": 1.0, "w8a8": 1.0, "int4": 1.0 + 8 / 32}
READ_BYTES = {"none": None, "int8": 1.0, "w8a8": 1.0, "int4": 0.5}
# The quantizations whose LM head is int8 on CPU (workers/layers/embedding.py); w8a8's stays in
# the model's dtype (`_int_mm` on the head was twice oneDNN bf16's time).
INT8_HEAD = ("int8", "int4")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def load_config(model: str) -> ModelConfig:
    p = Path(model)
    if p.is_file() and p.suffix == ".json":
        return ModelConfig.from_dict(json.loads(p.read_text()))
    if p.is_dir() and (p / "config.json").is_file():
        return ModelConfig.from_pretrained(p)
    from workers.model_source import resolve_model  # a GGUF or a built-in name: converted once, cached

    return ModelConfig.from_pretrained(resolve_model(model))


@dataclass(frozen=True)
class RankShape:
    """One rank's share at a tp degree (the largest rank: it sets the pace)."""

    proj_elements: int  # quantizable projections, all layers
    lm_head_elements: int
    other_elements: int  # norms, embedding (when not tied)
    q_heads: int
    kv_heads: int
    vocab_rows: int


class ModelShape:
    def __init__(self, cfg: ModelConfig, name: str = ""):
        if not cfg.is_llama_family:
            raise ConfigError("model", f"the planner prices the Llama family; {cfg.model_type} is not")
        self.cfg, self.name = cfg, name

    def rank(self, tp: int) -> RankShape:
        c = self.cfg
        if not 1 <= tp <= c.num_heads:
            raise ConfigError("tp", f"{tp} is not between 1 and the model's {c.num_heads} query heads")
        shard = max((head_shard(c.num_heads, c.num_kv_heads, tp, r) for r in range(tp)),
                    key=lambda s: (s.num_heads, s.num_kv_heads))
        d, h = c.head_dim, c.hidden_size
        inter = split_sizes(c.intermediate_size, tp)[0]
        vocab = split_sizes(c.vocab_size, tp)[0]
        per_layer = (shard.num_heads + 2 * shard.num_kv_heads) * d * h + h * shard.num_heads * d + 3 * inter * h
        embed = 0 if c.tie_word_embeddings else vocab * h
        return RankShape(c.num_layers * per_layer, vocab * h, embed + (2 * c.num_layers + 1) * h,
                         shard.num_heads, shard.num_kv_heads, vocab)

    def weight_bytes(self, tp: int, quantization: str, dtype: str, device: str = "cpu") -> float:
        r, b = self.rank(tp), DTYPE_BYTES[dtype]
        held = HELD_BYTES[quantization] or b
        plain = r.proj_elements * held + (r.lm_head_elements + r.other_elements) * b
        if device != "cpu":
            return plain
        if quantization not in INT8_HEAD:
            # Float layers on CPU may hold a oneDNN-packed copy beside the plain weight, wherever
            # the start-up probe picks it (workers/layers/linear_method.py): planned as if all do
            # (w8a8's float layer is its head).
            floats = r.lm_head_elements + (r.proj_elements if quantization == "none" else 0)
            return plain + floats * b
        # On CPU the head is quantized to int8 at load (workers/layers/embedding.py): its codes are
        # added; an untied head's float rows are dropped, a tied one's stay for the embedding.
        dropped = 0 if self.cfg.tie_word_embeddings else r.lm_head_elements * b
        return plain + r.lm_head_elements * HELD_BYTES["int8"] - dropped

    def kv_bytes_per_token(self, tp: int, dtype: str) -> int:
        """K and V of one token, all layers, on the largest rank."""
        return 2 * self.cfg.num_layers * self.rank(tp).kv_heads * self.cfg.head_dim * DTYPE_BYTES[dtype]

    def activation_bytes(self, tokens: int, tp: int, dtype: str) -> int:
        """Peak activations of a step of `tokens`: the MLP's gate/up output dominates, plus logits."""
        c, r = self.cfg, self.rank(tp)
        inter = split_sizes(c.intermediate_size, tp)[0]
        return (tokens * (2 * inter + 4 * c.hidden_size) + tokens * r.vocab_rows) * max(4, DTYPE_BYTES[dtype])

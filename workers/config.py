"""The model description tpserve needs, read from a Hugging Face config.json (no transformers import)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from workers.errors import CheckpointError, ModelNotFoundError, UnsupportedArchitectureError

LLAMA_FAMILY = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_MODEL_TYPES = (*LLAMA_FAMILY, "gpt2")


@dataclass(slots=True)
class ModelConfig:
    """Architecture hyper-parameters, normalised across families."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    tie_word_embeddings: bool
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False  # biases on q_proj, k_proj and v_proj
    o_proj_bias: bool = False
    mlp_bias: bool = False
    # Each token attends to the last `sliding_window` positions only (itself included); None: all.
    sliding_window: int | None = None
    hidden_act: str = "silu"
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    # GPT-2 only: divide attention scores by (layer_idx + 1) as well.
    scale_attn_by_inverse_layer_idx: bool = False

    @property
    def is_llama_family(self) -> bool:
        return self.model_type in LLAMA_FAMILY

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ModelNotFoundError(f"no config.json in {folder}")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, c: dict) -> "ModelConfig":
        mt = c.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"model_type {mt!r} (architectures {c.get('architectures')}) is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        eos = c.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        try:
            if mt == "gpt2":
                n_embd = c["n_embd"]
                return cls(
                    model_type=mt, vocab_size=c["vocab_size"], hidden_size=n_embd,
                    intermediate_size=c.get("n_inner") or 4 * n_embd, num_layers=c["n_layer"],
                    num_heads=c["n_head"], num_kv_heads=c["n_head"], head_dim=n_embd // c["n_head"],
                    max_position_embeddings=c["n_positions"], norm_eps=c.get("layer_norm_epsilon", 1e-5),
                    tie_word_embeddings=c.get("tie_word_embeddings", True), attention_bias=True, mlp_bias=True,
                    hidden_act=c.get("activation_function", "gelu_new"), eos_token_ids=eos_ids,
                    bos_token_id=c.get("bos_token_id"),
                    scale_attn_by_inverse_layer_idx=c.get("scale_attn_by_inverse_layer_idx", False),
                )
            rope = c.get("rope_parameters") or {}
            qkv_bias, o_bias = _attention_biases(mt, c)
            scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
            heads = c["num_attention_heads"]
            return cls(
                model_type=mt, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
                num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
                head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                max_position_embeddings=c.get("max_position_embeddings", 2048),
                norm_eps=c.get("rms_norm_eps", 1e-6), tie_word_embeddings=c.get("tie_word_embeddings", False),
                rope_theta=float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0), rope_scaling=scaling,
                attention_bias=qkv_bias, o_proj_bias=o_bias, mlp_bias=c.get("mlp_bias", False),
                sliding_window=_sliding_window(mt, c),
                hidden_act=c.get("hidden_act", "silu"), eos_token_ids=eos_ids, bos_token_id=c.get("bos_token_id"),
            )
        except KeyError as e:
            raise CheckpointError(f"config.json lacks {e.args[0]!r} for model_type {mt!r}") from None


def _attention_biases(model_type: str, c: dict) -> tuple[bool, bool]:
    """(q/k/v bias, o_proj bias), as each family's transformers class builds them: Qwen2 always has
    q/k/v biases and never an o_proj bias (its config says neither); Mistral has none; Llama puts
    `attention_bias` on all four."""
    if model_type == "qwen2":
        return True, False
    if model_type == "mistral":
        return False, False
    bias = bool(c.get("attention_bias", False))
    return bias, bias


def _sliding_window(model_type: str, c: dict) -> int | None:
    """Mistral's window applies to every layer. Qwen2's applies only with use_sliding_window, and
    then only from max_window_layers on; that per-layer mix is refused rather than run wrong."""
    window = c.get("sliding_window")
    if model_type == "mistral":
        return int(window) if window else None
    if model_type == "qwen2" and c.get("use_sliding_window") and window:
        raise UnsupportedArchitectureError(
            "Qwen2 with use_sliding_window=true (a window on some layers only) is not supported; "
            "set use_sliding_window to false in config.json if prompts stay within sliding_window")
    return None

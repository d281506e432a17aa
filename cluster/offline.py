"""Offline generation for the CLI: resolve the model, start its worker group, tokenize, generate."""
from __future__ import annotations

from workers.errors import ConfigError
from workers.config import ModelConfig
from workers.engine.sampling_params import SamplingParams
from workers.launcher import start_worker_group
from workers.model_source import resolve_model
from workers.worker import DTYPES, WorkerSpec


def load_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


class OfflineGenerator:
    """One replica in this process (tp 1) or as local processes (tp > 1)."""

    def __init__(self, model: str, tp: int = 1, device: str = "cpu", dtype: str | None = None):
        dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
        if dtype not in DTYPES:
            raise ConfigError("dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")
        if tp < 1:
            raise ConfigError("tp", f"must be >= 1, got {tp}")
        self.folder = resolve_model(model)
        spec = WorkerSpec(str(self.folder), tp_size=tp, device=device, dtype=dtype)
        spec.validate(ModelConfig.from_pretrained(self.folder))  # refuse a bad tp before spawning
        self.tokenizer = load_tokenizer(self.folder)
        self.group = start_worker_group(spec)

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if chat:
            return list(self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                           add_generation_prompt=True, tokenize=True,
                                                           return_dict=False))
        return self.tokenizer(prompt).input_ids

    def generate_text(self, prompt: str, max_tokens: int, temperature: float = 0.0, seed: int | None = None,
                      chat: bool = False) -> str:
        ids = self.encode(prompt, chat)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
        return self.group.engine.generate([ids], params)[0].text

    def close(self) -> None:
        self.group.close()

    def __enter__(self) -> "OfflineGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Offline generation for the CLI: resolve the model, start its worker group, tokenize, generate."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from workers.engine.client import Completion

from workers.errors import ConfigError
from workers.config import ModelConfig
from workers.engine.core import EngineConfig
from workers.engine.sampling_params import SamplingParams
from workers.launcher import start_worker_group
from workers.model_source import resolve_model
from workers.defaults import default_dtype
from workers.worker import DTYPES, WorkerSpec


def load_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


class OfflineGenerator:
    """One replica in this process (tp 1) or as local processes (tp > 1)."""

    def __init__(self, model: str, tp: int = 1, device: str = "cpu", dtype: str | None = None,
                 kv_cache_memory: int | None = None, max_model_len: int | None = None, quantization: str = "none",
                 quant_group_size: int = 32, cpu_collectives: str = "shm", compile: bool = False,
                 speculative=None):
        """`speculative`: a workers.engine.speculative.SpeculativeConfig, or None."""
        dtype = dtype or default_dtype(device)
        if dtype not in DTYPES:
            raise ConfigError("dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")
        if tp < 1:
            raise ConfigError("tp", f"must be >= 1, got {tp}")
        self.folder = resolve_model(model)
        spec = WorkerSpec(str(self.folder), tp_size=tp, device=device, dtype=dtype,
                          kv_cache_memory=kv_cache_memory, max_model_len=max_model_len, quantization=quantization,
                          quant_group_size=quant_group_size, cpu_collectives=cpu_collectives, compile=compile)
        spec.validate(ModelConfig.from_pretrained(self.folder))  # refuse a bad tp before spawning
        self.tokenizer = load_tokenizer(self.folder)
        self.group = start_worker_group(spec, EngineConfig(speculative=speculative).validate())

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

    def generate_many(self, requests: list[tuple[str, SamplingParams]], chat: bool = False) -> list[Completion]:
        """All requests at once through the engine (they batch); results in input order."""
        streams = [self.group.engine.add_request(self.encode(prompt, chat), params) for prompt, params in requests]
        return [s.result() for s in streams]

    def close(self) -> None:
        self.group.close()

    def __enter__(self) -> "OfflineGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


FILE_FIELDS = {"prompt": str, "max_tokens": int, "temperature": (int, float), "top_p": (int, float),
               "top_k": int, "seed": int, "stop": list}


def read_prompts_file(path: str, defaults) -> list[tuple[str, SamplingParams]]:
    """Parse and validate the whole file first: a bad line is reported by number and field."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError("--prompts-file", f"no such file: {path}")
    requests = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}", f"not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{path}:{n}", "each line must be a JSON object")
        unknown = set(obj) - set(FILE_FIELDS)
        if unknown:
            raise ConfigError(f"{path}:{n}", f"unknown field(s) {sorted(unknown)}; allowed: {sorted(FILE_FIELDS)}")
        for key, kind in FILE_FIELDS.items():
            if key in obj and (not isinstance(obj[key], kind) or isinstance(obj[key], bool)):
                raise ConfigError(f"{path}:{n}: {key}", f"has the wrong type ({type(obj[key]).__name__})")
        if not obj.get("prompt"):
            raise ConfigError(f"{path}:{n}: prompt", "is missing or empty")
        params = SamplingParams(
            max_tokens=obj.get("max_tokens", defaults.max_tokens), temperature=obj.get("temperature", defaults.temperature),
            top_p=obj.get("top_p", 1.0), top_k=obj.get("top_k", 0), seed=obj.get("seed", defaults.seed),
            stop=obj.get("stop", []))
        try:
            params.validate()
        except ConfigError as e:
            raise ConfigError(f"{path}:{n}: {e.field}", e.message) from None
        requests.append((obj["prompt"], params))
    if not requests:
        raise ConfigError("--prompts-file", f"{path} holds no prompts")
    return requests


def write_results(results: list[Completion], out: str | None) -> None:
    lines = [json.dumps({"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                         "prompt_tokens": c.prompt_tokens}) for c in results]
    if out is None:
        sys.stdout.write("\n".join(lines) + "\n")
    else:
        Path(out).write_text("\n".join(lines) + "\n")

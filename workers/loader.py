"""The one weight loader: each rank reads only its own slices of a safetensors checkpoint.

safetensors slices are lazy (memory-mapped), so `TensorSource.read` touches only the bytes of
the rows/columns a layer owns. The reader counts those bytes; tests assert the count.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors import safe_open
from torch import nn

from workers.errors import CheckpointError, ModelNotFoundError
from workers.tensor_source import ReadCounter, TensorSource

log = logging.getLogger(__name__)


class CheckpointReader:
    """Index of every tensor in a folder's *.safetensors files, opened lazily."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ModelNotFoundError(f"no *.safetensors files in {self.folder}")
        self.counter = ReadCounter()
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {name: h for h in self._handles for name in h.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> TensorSource:
        if name not in self._where:
            # Original GPT-2 checkpoints omit the "transformer." prefix.
            alt = name.removeprefix("transformer.")
            if alt not in self._where:
                raise CheckpointError(f"checkpoint in {self.folder} has no tensor {name!r}")
            name = alt
        return TensorSource.wrap(name, self._where[name].get_slice(name), self.counter)


def load_weights(model: nn.Module, folder: str | Path) -> ReadCounter:
    """Fill every parameter of this rank's model from the checkpoint; returns the bytes read."""
    reader = CheckpointReader(folder)
    for name, param in model.named_parameters():  # tied weights appear once
        loader = getattr(param, "weight_loader", None)
        if loader is None:
            raise CheckpointError(f"parameter {name} has no weight_loader")
        for ckpt_name, shard_id, transposed in model.checkpoint_sources(name):
            src = reader.get(ckpt_name)
            loader(param, src.T if transposed else src, shard_id)
    log.debug("loaded %s: %d bytes read", folder, reader.counter.bytes_read)
    return reader.counter


def read_generation_eos(folder: str | Path) -> list[int]:
    """EOS ids from generation_config.json, which may list more than config.json."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

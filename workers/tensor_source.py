"""A lazy view of one checkpoint tensor: layers read only the rows or columns they own.

Wraps a safetensors slice (nothing is read until `read`) or an in-memory tensor (tests). Views
narrow and transpose without reading, so a fused tensor (GPT-2's c_attn) or a transposed one
(GPT-2's Conv1D) is cut the same way as a plain [out, in] weight. Every read is counted, which
is how the tests prove no rank reads the whole checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workers.errors import CheckpointError


@dataclass(slots=True)
class ReadCounter:
    """Bytes a rank has read from checkpoint files."""

    bytes_read: int = 0


@dataclass(slots=True)
class TensorSource:
    """A logical [out, in] (or 1-D) view over a stored tensor."""

    name: str
    raw: object  # safetensors PySafeSlice or torch.Tensor
    counter: ReadCounter
    # Per logical dim: (start, length) into the stored tensor, in logical order.
    window: list[tuple[int, int]] = field(default_factory=list)
    transposed: bool = False

    @classmethod
    def wrap(cls, name: str, raw: object, counter: ReadCounter | None = None) -> "TensorSource":
        shape = list(raw.get_shape()) if hasattr(raw, "get_shape") else list(raw.shape)
        return cls(name, raw, counter or ReadCounter(), [(0, n) for n in shape])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(n for _, n in self.window)

    @property
    def T(self) -> "TensorSource":
        if len(self.window) != 2:
            raise CheckpointError(f"{self.name}: only 2-D tensors can be transposed")
        return TensorSource(self.name, self.raw, self.counter, self.window[::-1], not self.transposed)

    def narrow(self, dim: int, start: int, length: int) -> "TensorSource":
        s, n = self.window[dim]
        if start < 0 or start + length > n:
            raise CheckpointError(f"{self.name}: slice {start}:{start + length} of dim {dim} is outside size {n}")
        window = list(self.window)
        window[dim] = (s + start, length)
        return TensorSource(self.name, self.raw, self.counter, window, self.transposed)

    def read(self) -> torch.Tensor:
        """Materialise this view (only its bytes are read from disk)."""
        stored = self.window[::-1] if self.transposed else self.window
        index = tuple(slice(s, s + n) for s, n in stored)
        t = self.raw[index] if index else self.raw[...]
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t)
        self.counter.bytes_read += t.numel() * t.element_size()
        return t.t() if self.transposed else t

    def read_rows(self, start: int, end: int) -> torch.Tensor:
        return self.narrow(0, start, end - start).read()

    def read_cols(self, start: int, end: int) -> torch.Tensor:
        return self.narrow(1, start, end - start).read()


def copy_into(param: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise CheckpointError(f"{what}: checkpoint slice has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value.to(dtype=param.dtype))

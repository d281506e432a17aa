"""Kernel choices made on the running machine: a short timing at start-up, cached on disk.

Which of two formulations of a matmul is faster depends on the CPU, its caches, the thread count
and the shape: issue 12 kept a batched GEMV because MKL's `x @ W.T` ran at ~10 GB/s on that
session's machine; on the next machine the same GEMV was 2.4-4.8x slower than `F.linear`. So a
layer does not carry a constant chosen elsewhere: after loading, it asks `KernelProbe.choose`
for the largest row count at which one candidate beats the other, measured on its own weights.

Answers are cached per machine (CPU model and flags, torch version) in
<cache>/kernels/<machine>-<probe version>.json, keyed by the decision, the shape, the dtype and the
thread count, so a second start measures nothing. `TPSERVE_KERNEL_PROBE=off` skips timing and takes
each decision's stated default (for debugging, or a machine too loaded to measure).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# A candidate must beat the incumbent by this much to be chosen: within it, timings on a shared
# machine are noise, and the incumbent (F.linear, the packed kernel) is the simpler path.
MARGIN = 0.9
# In the cache file's name: answers timed by an older probe are timed again (2: interleaved timing).
PROBE_VERSION = 2


def _cpu_identity() -> str:
    model, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}|{flags}"


def machine_key() -> str:
    h = hashlib.sha256(f"{_cpu_identity()}|{torch.__version__}|{os.cpu_count()}".encode())
    return h.hexdigest()[:16]


def time_pair(a: Callable[[], object], b: Callable[[], object] | None, reps: int = 5,
              passes: int = 3) -> tuple[float, float]:
    """Seconds per call of `a` and of `b`, each the best of `passes` runs of `reps` calls, the runs
    interleaved (a b, b a, a b, ...) after two warm-up calls each. Timed one after the other, a
    burst of load on a shared machine lands on one side only: a start-up probe during a test run
    cached F.linear over the GEMV for SmolLM2's qkv and gate_up on 2026-12-05's machine, where the
    GEMV was 2.6-3.2x faster idle, and that answer cost every later start ~20 ms per token."""
    fns = [a] if b is None else [a, b]
    for fn in fns:
        fn()
        fn()
    best = [float("inf")] * len(fns)
    for p in range(passes):
        for i in (range(len(fns)) if p % 2 == 0 else reversed(range(len(fns)))):
            t = time.perf_counter()
            for _ in range(reps):
                fns[i]()
            best[i] = min(best[i], (time.perf_counter() - t) / reps)
    return best[0], best[-1]


class KernelProbe:
    """Cached answers to "up to how many rows does candidate A beat B here?"."""

    def __init__(self, path: Path | None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.answers: dict[str, int] = {}
        self.measured = 0  # decisions timed by this process (a warm cache times none)
        if path is not None and path.is_file():
            try:
                self.answers = {k: int(v) for k, v in json.loads(path.read_text()).items()}
            except (ValueError, OSError, AttributeError):
                log.warning("ignoring an unreadable kernel cache %s", path)

    @classmethod
    def for_this_machine(cls) -> "KernelProbe":
        from workers.model_source import cache_dir

        enabled = os.environ.get("TPSERVE_KERNEL_PROBE", "on").lower() not in ("off", "0", "false")
        return cls(cache_dir() / "kernels" / f"{machine_key()}-{PROBE_VERSION}.json", enabled)

    def rows_limit(self, decision: str, shape: Sequence[int], dtype: torch.dtype, rows: Sequence[int],
                   candidate: Callable[[int], Callable[[], object]],
                   incumbent: Callable[[int], Callable[[], object]], default: int) -> int:
        """The largest of `rows` up to which `candidate(rows)` beats `incumbent(rows)` at every
        probed count (0: at none). Each argument builds the call to time at that row count."""
        key = f"{decision}|{'x'.join(map(str, shape))}|{str(dtype).removeprefix('torch.')}|t{torch.get_num_threads()}"
        if key in self.answers:
            return self.answers[key]
        if not self.enabled:
            return default
        if self.measured == 0:  # a first start on this machine: say why it takes seconds more
            log.info("timing kernel choices for this machine (once; cached in %s)", self.path)
        limit = 0
        for r in rows:
            cand, inc = time_pair(candidate(r), incumbent(r))
            if cand < MARGIN * inc:
                limit = r
            else:
                break
        self.answers[key] = limit
        self.measured += 1
        self._save(key, limit)
        return limit

    def _save(self, key: str, value: int) -> None:
        """Merge into the file (ranks of one replica probe at once) and replace it atomically."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {}
            if self.path.is_file():
                try:
                    merged = json.loads(self.path.read_text())
                except ValueError:
                    merged = {}
            merged[key] = value
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".kernels-")
            with os.fdopen(fd, "w") as f:
                json.dump(merged, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only cache costs a re-probe next start, nothing else
            log.warning("kernel choice not cached (%s)", e)

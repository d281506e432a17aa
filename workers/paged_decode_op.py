"""`torch.ops.tpserve.paged_decode`: decode attention read in place from the paged KV cache on CPU
(workers/csrc/paged_decode.cpp), built once per machine and chosen at start-up.

Built here, not shipped as a binary: compiled with the system's C++ compiler against this torch,
with -march=native for the CPU that runs it, into <cache>/kernels/paged_decode-<key>.so, the key
being the source, the machine (kernel_probe.machine_key) and torch's version and ABI. Ranks that
start together take a file lock, so one builds and the others load its file. Where it cannot be
built (no compiler: the k8s image is python:3.11-slim) decode attention keeps the gather path,
with one warning. `TPSERVE_PAGED_DECODE=off` keeps the gather path too, and `always` takes the
in-place kernel whatever the probe says (both for comparisons and tests).

Which path serves is a kernel choice of the running machine (workers/kernel_probe.py): the gather
path, unless this kernel beats it by the probe's margin at every probed batch. Measured on
2026-12-04's AVX2 EPYC it does not (0.93x the gather path's throughput at 64 sequences: its
per-(sequence, KV head) scalar loops lose to SDPA's vectorized kernel more than the copy costs).
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
_loaded: dict[str, str | None] = {}  # "why": None once loaded, else why not; "key": the build's


def available() -> bool:
    """Whether the op is loaded in this process (built first if this machine has no build yet)."""
    if "why" not in _loaded:
        _loaded["why"] = _load()
        if _loaded["why"] is not None:
            log.warning("decode attention keeps the gather path: %s", _loaded["why"])
    return _loaded["why"] is None


def _mode() -> str:
    return os.environ.get("TPSERVE_PAGED_DECODE", "on").lower()


def _load() -> str | None:
    if _mode() in ("off", "0", "false"):
        return "TPSERVE_PAGED_DECODE=off"
    try:
        so = _built()
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        detail = getattr(e, "stderr", "") or ""
        return f"the in-place kernel did not build ({type(e).__name__}: {str(detail).strip()[-300:] or e})"
    if so is None:
        return "no C++ compiler (g++ or $CXX) on this machine"
    torch.ops.load_library(str(so))
    return None


def _built() -> Path | None:
    from torch.utils import cpp_extension

    from workers.kernel_probe import machine_key
    from workers.model_source import cache_dir

    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        return None
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    key = hashlib.sha256(SOURCE.read_bytes() + f"|{machine_key()}|{torch.__version__}|{abi}".encode()).hexdigest()
    _loaded["key"] = key[:16]
    out = cache_dir() / "kernels" / f"paged_decode-{key[:16]}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".paged_decode.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be building it now
        if out.is_file():
            return out
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".paged_decode-", suffix=".so")
        os.close(fd)
        try:
            cmd = [cxx, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
                   f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in cpp_extension.include_paths()),
                   str(SOURCE), *(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu",
                   "-o", tmp]
            log.info("building the in-place paged decode kernel for this machine (once): %s", out.name)
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


PROBE_SEQS = (1, 4, 16, 64)
PROBE_CONTEXT = 256  # tokens per probed sequence


def gather_up_to(probe, num_kv_heads: int, num_heads_of: list[int], head_dim: int, block_size: int,
                 dtype: torch.dtype) -> int:
    """Decoding sequences up to which the gather path serves: 0 (the in-place kernel always) only
    where the probe times the kernel faster than the gather path by its margin at every probed
    count, on a scratch one-layer cache of this rank's shape; else the gather path always. The
    gather path is the default: on 2026-12-04's AVX2 EPYC the kernel ran 0.93x its throughput at
    64 sequences (docs/benchmarks.md). `num_heads_of`: each local query head's KV head."""
    if not available():
        return 1 << 30
    if _mode() == "always":
        return 0
    if probe is None:
        return 1 << 30
    from workers.kv_cache import HeadLayout
    from workers.paged_cache import PagedKVCache, PagedSeq

    per_seq = -(-PROBE_CONTEXT // block_size)
    heads = HeadLayout.build(num_heads_of, num_kv_heads)
    scale = head_dim ** -0.5

    def build(n: int, in_place: bool):
        cache = PagedKVCache(1, n * per_seq, block_size, num_kv_heads, head_dim, dtype, "cpu")
        cache.k.normal_(), cache.v.normal_()
        cache.gather_up_to = 0 if in_place else 1 << 30
        seqs = [PagedSeq(PROBE_CONTEXT - 1, 1, list(range(i * per_seq, (i + 1) * per_seq))) for i in range(n)]
        q = torch.randn(n, len(num_heads_of), head_dim, dtype=dtype)
        k = torch.randn(n, num_kv_heads, head_dim, dtype=dtype)
        attn = cache.batch(seqs)
        return lambda: attn.attend(0, q, k, k, heads, scale)

    # The decision is named after the build, so a changed kernel is timed again.
    wins_up_to = probe.rows_limit(f"paged_decode_in_place@{_loaded['key']}",
                                  (num_kv_heads, len(num_heads_of), head_dim, block_size),
                                  dtype, PROBE_SEQS, candidate=lambda n: build(n, True),
                                  incumbent=lambda n: build(n, False), default=0)
    return 0 if wins_up_to == PROBE_SEQS[-1] else 1 << 30

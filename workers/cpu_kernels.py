"""tpserve's own CPU kernels (workers/csrc/*.cpp: `tpserve::paged_decode`, `tpserve::gemv`, the fused
ops of workers/fused_ops.py), built once per machine into one library and loaded into the process that
imported torch.

Built here, not shipped as a binary: compiled with the system's C++ compiler against this torch,
with -march=native for the CPU that runs it (AVX-512 or AVX2, whichever the draw has), into
<cache>/kernels/tpserve_cpu-<key>.so, the key being the sources and their headers, the machine
(kernel_probe.machine_key) and torch's version and ABI. Ranks that start together take a file
lock, so one builds and the others load its file. Where it cannot be built (no compiler: the k8s
image is python:3.11-slim) every caller keeps PyTorch's own kernels, with one warning.
`TPSERVE_CPU_KERNELS=off` keeps them too (for comparisons). Whether each kernel serves is a
choice of the running machine (workers/kernel_probe.py), named after `build_key()` so a changed
kernel is timed again.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))  # included by the sources: part of the key
BUILT_ENV = "TPSERVE_CPU_KERNELS_BUILT"  # the .so this process loaded, for the ranks it starts
_state: dict[str, str | None] = {}  # "why": None once loaded, else why not; "key": the build's


def available() -> bool:
    """Whether the kernels are loaded in this process (built first if this machine has no build yet)."""
    if "why" not in _state:
        _state["why"] = _load()
        if _state["why"] is not None:
            log.warning("tpserve's CPU kernels are not loaded, PyTorch's serve: %s", _state["why"])
    return _state["why"] is None


def takes(dtype: torch.dtype) -> bool:
    """Whether the kernels are loaded and take activations of `dtype`: float32 and bfloat16 (their
    C++ has no float16 path; a float16 model keeps PyTorch's kernels)."""
    return dtype in (torch.float32, torch.bfloat16) and available()


def build_key() -> str:
    """The loaded build's key (sources, machine, torch): probe decisions are named after it."""
    if not available():
        raise RuntimeError(f"tpserve's CPU kernels are not loaded: {_state['why']}")
    return str(_state["key"])


def _load() -> str | None:
    if os.environ.get("TPSERVE_CPU_KERNELS", "on").lower() in ("off", "0", "false"):
        return "TPSERVE_CPU_KERNELS=off"
    try:
        so = _built()
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        detail = getattr(e, "stderr", "") or ""
        return f"they did not build ({type(e).__name__}: {str(detail).strip()[-300:] or e})"
    if so is None:
        return "no C++ compiler (g++ or $CXX) on this machine"
    torch.ops.load_library(str(so))
    # Ranks started from here (their environment is this one's) load this build rather than look
    # for it in their own cache folder, which a test's private TPSERVE_CACHE_DIR leaves empty: each
    # rank then built the kernels again (~30 s of a tp 2 test).
    os.environ[BUILT_ENV] = str(so)
    _register_fakes()
    return None


def _register_fakes() -> None:
    """Shapes without running, for torch.compile: a compiled step traces `tpserve::gemv` into its
    graph as one opaque call (without this, each call was a graph break, and the breaks' frames
    recompiled per layer class until dynamo's limit sent the step back to eager)."""
    @torch.library.register_fake("tpserve::gemv")
    def _gemv(x, weight, scale):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("tpserve::w8a8_linear")
    def _w8a8_linear(x, codes, scale, gemv):
        return x.new_empty((x.shape[0], codes.shape[0]))

    @torch.library.register_fake("tpserve::int4_gemv")
    def _int4_gemv(x, packed, group):
        from workers.quantization import int4_gemv_rows
        return x.new_empty((x.shape[0], int4_gemv_rows(packed, x.shape[1], group)))

    @torch.library.register_fake("tpserve::int4_gemv_dequantize")
    def _int4_gemv_dequantize(packed, group, k, dtype):
        from workers.quantization import int4_gemv_rows
        return packed.new_empty((int4_gemv_rows(packed, k, group), k), dtype=dtype)

    @torch.library.register_fake("tpserve::quantize_rows")
    def _quantize_rows(x):
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("tpserve::paged_decode")
    def _paged_decode(q, k_cache, v_cache, block_tables, seq_lens, rows, kv_index, scale, window, out):
        return None


def _built() -> Path | None:
    from workers.kernel_probe import machine_key
    from workers.model_source import cache_dir

    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return None
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    digest = hashlib.sha256()
    for src in [*SOURCES, *HEADERS]:
        digest.update(src.name.encode() + b"\0" + src.read_bytes())
    digest.update(f"|{machine_key()}|{torch.__version__}|{abi}".encode())
    key = _state["key"] = digest.hexdigest()[:16]
    out = cache_dir() / "kernels" / f"tpserve_cpu-{key}.so"
    built = Path(os.environ.get(BUILT_ENV, ""))
    if built.name == out.name and built.is_file():  # the same build, loaded by the process that started us
        return built
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".tpserve_cpu.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be building it now
        if out.is_file():
            return out
        log.info("building tpserve's CPU kernels for this machine (once per machine and torch; the "
                 "next starts load it): %s", out.name)
        t = time.perf_counter()
        compile_library(list(SOURCES), out)
        log.info("built %s in %.0f s", out.name, time.perf_counter() - t)
    return out


def compile_library(sources: list[Path], out: Path) -> None:
    """Compile and link C++ sources into the shared library `out`, for this machine (-march=native),
    against this torch; `out` appears whole or not at all."""
    from torch.utils import cpp_extension

    cxx = shutil.which(os.environ.get("CXX", "g++")) or "g++"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tpserve_cpu-") as tmp:
        flags = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                 *(f"-I{p}" for p in cpp_extension.include_paths())]
        objs = [os.path.join(tmp, f"{src.stem}.o") for src in sources]
        # One compiler per source at once: a worker's first start on a machine waits for them.
        procs = [subprocess.Popen([cxx, *flags, "-c", str(src), "-o", obj], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for src, obj in zip(sources, objs)]
        try:
            for proc in procs:
                _, err = proc.communicate(timeout=600)
                if proc.returncode:
                    raise subprocess.CalledProcessError(proc.returncode, proc.args, stderr=err)
        finally:
            for proc in procs:
                if proc.poll() is None:  # a sibling failed: nothing will link its object
                    proc.kill()
                    proc.wait()
        so = os.path.join(tmp, "lib.so")
        subprocess.run([cxx, "-shared", "-fopenmp", *objs, *(f"-L{p}" for p in cpp_extension.library_paths()),
                        "-lc10", "-ltorch_cpu", "-o", so], check=True, capture_output=True, text=True, timeout=600)
        os.replace(so, out)

"""A rank's weights and KV cache sit in 2 MiB pages (workers/huge_pages.py), and serve the same
logits as PyTorch's own allocations."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import folder_env
from tests.models import make_tiny_llama
from workers import cpu_kernels, huge_pages
from workers.huge_pages import HUGE_PAGE, huge_page_bytes
from workers.paged_cache import PagedSeq
from workers.step_plan import PlanOp, StepPlan
from workers.worker import Worker, WorkerSpec

pytestmark = pytest.mark.skipif(huge_pages.available() is not None,
                                reason=f"no transparent huge pages here: {huge_pages.available()}")


@pytest.fixture(autouse=True, scope="module")
def private_cache(tmp_path_factory):
    """Quantized copies and probe answers go to this module's own cache (the built kernels are
    loaded first, from the shared one, as the other modules' collection does)."""
    cpu_kernels.available()
    yield from folder_env(tmp_path_factory, "TPSERVE_CACHE_DIR", "cache")


def _smaps(ptr: int) -> dict[str, str]:
    """/proc/self/smaps' fields for the mapping that holds `ptr`."""
    fields, inside = None, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(a, 16) for a in head.split("-"))
                inside = lo <= ptr < hi
                if inside:
                    fields = {}
            elif inside:
                fields[head.rstrip(":")] = line.split(":", 1)[1].strip()
    if fields is None:
        raise AssertionError(f"no mapping holds {ptr:#x}")
    return fields


def _huge_kib(ptr: int) -> int:
    return int(_smaps(ptr)["AnonHugePages"].split()[0])


def _thp_fallbacks() -> int:
    """How often the kernel (system-wide) wanted a huge page at a fault and had none to give."""
    with open("/proc/vmstat") as f:
        return sum(int(n) for k, n in (line.split() for line in f) if k.startswith("thp_fault_fallback"))


def _assert_in_huge_pages(ptr: int, fallbacks_before: int) -> None:
    """The mapping is advised MADV_HUGEPAGE (VmFlags "hg") and backed by huge pages, unless the
    kernel recorded that it ran out of them meanwhile: that is the kernel's call, not ours. Advice
    given after the memory was touched shows no fallback and no huge page, and fails."""
    assert "hg" in _smaps(ptr)["VmFlags"].split()
    assert _huge_kib(ptr) >= HUGE_PAGE // 1024 or _thp_fallbacks() > fallbacks_before


def _thp_setting() -> str:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        return f.read()


def test_memory_asked_for_in_huge_pages_is_backed_by_them():
    before = _thp_fallbacks()
    buf = huge_page_bytes(8 * HUGE_PAGE)
    assert buf.data_ptr() % HUGE_PAGE == 0 and buf.numel() == 8 * HUGE_PAGE
    buf.fill_(1)
    _assert_in_huge_pages(buf.data_ptr(), before)
    if "[madvise]" in _thp_setting():  # the control: without the advice, PyTorch's memory is in 4 KiB pages
        plain = torch.empty(8 * HUGE_PAGE + 4096, dtype=torch.uint8).fill_(1)
        assert _huge_kib(plain.data_ptr()) < HUGE_PAGE // 1024
        assert "hg" not in _smaps(plain.data_ptr())["VmFlags"].split()


def test_a_small_arena_after_freed_tensors_is_still_in_huge_pages():
    """glibc serves a few MiB from heap memory that freed tensors touched, once freeing a 16 MiB
    block has raised its mmap threshold; advice on that memory comes too late (CI found a tiny
    model's arena there, 0 kB in huge pages). The arena is a mapping of its own."""
    torch.empty(16 << 20, dtype=torch.uint8).fill_(1)
    dirty = [torch.empty((i % 7 + 1) << 20, dtype=torch.uint8).fill_(1) for i in range(24)]
    del dirty[::2]  # holes of 1-7 MiB, touched, in the heap
    before = _thp_fallbacks()
    buf = huge_page_bytes(100_000)
    buf.fill_(1)
    assert buf.data_ptr() % HUGE_PAGE == 0
    _assert_in_huge_pages(buf.data_ptr(), before)


def _worker(folder, dtype: str, quantization: str) -> Worker:
    return Worker(WorkerSpec(str(folder), tp_size=1, dtype=dtype, kv_cache_memory=8 << 20,
                             quantization=quantization), 0)


def _logits(worker: Worker) -> torch.Tensor:
    """A prefill of two prompts, then one decode step of both: both steps' logits."""
    seqs = [PagedSeq(0, 7, [0]), PagedSeq(0, 5, [1])]
    prefill = worker.execute(StepPlan(PlanOp.STEP, seqs, [3, 4, 5, 6, 7, 8, 9, 20, 21, 22, 23, 24], [6, 11]))
    decode = worker.execute(StepPlan(PlanOp.STEP, [PagedSeq(7, 1, [0]), PagedSeq(5, 1, [1])], [10, 25], [0, 1]))
    return torch.cat([prefill, decode])


@pytest.mark.parametrize("dtype,quantization", [("float32", "none"), ("bfloat16", "int8")])
def test_a_worker_in_huge_pages_serves_the_same_logits(tmp_path, monkeypatch, dtype, quantization):
    folder = make_tiny_llama(tmp_path / "tied", tie=True)
    monkeypatch.setenv("TPSERVE_HUGE_PAGES", "off")
    plain = _worker(folder, dtype, quantization)
    monkeypatch.setenv("TPSERVE_HUGE_PAGES", "on")
    before = _thp_fallbacks()
    huge = _worker(folder, dtype, quantization)
    try:
        assert plain.load_report()["huge_page_bytes"] == 0
        placed = huge.load_report()["huge_page_bytes"]
        params = {id(p): p for p in huge.model.parameters()}.values()
        assert placed >= sum(p.numel() * p.element_size() for p in params)
        # Every parameter inside the one arena, which is in huge pages; the KV cache too.
        lo = min(p.data_ptr() for p in params)
        assert lo % HUGE_PAGE == 0 and all(lo <= p.data_ptr() < lo + placed for p in params)
        _assert_in_huge_pages(lo, before)
        assert huge.cache.k.data_ptr() % HUGE_PAGE == 0
        _assert_in_huge_pages(huge.cache.k.data_ptr(), before)
        if quantization == "none":  # the tied head still reads the embedding's rows
            assert huge.model.lm_head.weight.data_ptr() == huge.model.model.embed_tokens.weight.data_ptr()
        a, b = _logits(plain), _logits(huge)
        assert a.abs().max() > 0 and torch.equal(a, b)
    finally:
        plain.close()
        huge.close()

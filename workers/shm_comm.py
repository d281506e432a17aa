"""Collectives through shared memory for the ranks of one replica on one host (CPU).

Gloo moves a 576-float all-reduce through TCP loopback in 0.6-1 ms; a decode step has 61 of
them. Ranks on one host can instead write into one shared segment and read each other's slots,
as vLLM's CPU backend and DeepSpeed's shm all-reduce do. Gloo stays for rendezvous, for the
load-time collectives and as the fallback when the ranks do not share /dev/shm.

Protocol. Every rank counts its collectives (they run in the same order on every rank: the
plan broadcast, the step's all-reduces, the logits gather). For collective `seq` a rank writes
its input into its slot of parity seq % 2, then stores seq in its arrival word; it reads what it
needs once the arrival words it waits on reach seq. Two parities mean a rank only overwrites a
slot after every rank has arrived at seq - 1, that is, finished reading seq - 2.

Waiting spins for a bounded time (the peer is usually microseconds behind), then sleeps on a
futex over the arrival word it waits for. The futex call goes through ctypes, which releases the
GIL, so rank 0's other threads (the controller's ping, `poll`) run meanwhile. A peer that exits
is seen within a tenth of a second (its pid is gone); one that hangs (SIGSTOP) fails the
collective after the group's collective timeout. Both raise WorkerError, as gloo's errors would.

Every rank sums the slots in rank order, so all ranks hold bitwise equal results.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import platform
import secrets
import time

import torch
import torch.distributed as dist

from workers.errors import WorkerError

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
CONTROL_BYTES = 4096
LINE = 64  # bytes per rank in the control area: arrival word, sleeping word, pid
MAGIC = 0x7470_7376  # "tpsv", in the control area's last word (the first ones are arrival words)
_MAGIC_WORD = CONTROL_BYTES // 4 - 1
SPIN_S = 100e-6  # a peer within this is waited for without a syscall
LIVENESS_S = 0.1  # how often a sleeping waiter checks that its peer still exists
_U32 = 1 << 32
_HALF = 1 << 31

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "arm64": 98}.get(platform.machine())
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1  # shared (not FUTEX_PRIVATE): the word lives in a shared mapping


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True) if _SYS_FUTEX is not None else None


def default_slot_bytes(size: int) -> int:
    """Per rank and parity: 8 MiB at tp 2, less at larger tp so the segment stays <= 32 MiB
    (Docker's default /dev/shm is 64 MiB, and Ray's object store lives there too)."""
    per = max(1 << 20, min(8 << 20, (32 << 20) // (2 * size)))
    return per - per % 4096  # page-aligned slots: every dtype views them


def _reached(word: int, seq: int) -> bool:
    return (word - seq) % _U32 < _HALF  # seq counts modulo 2**32


class ShmCommunicator:
    """All-reduce, gather to rank 0 and broadcast from rank 0 over one shared segment."""

    def __init__(self, rank: int, size: int, mm: mmap.mmap, slot_bytes: int, timeout_s: float):
        self.rank, self.size, self.slot_bytes, self.timeout_s = rank, size, slot_bytes, timeout_s
        self._mm = mm
        self._ctl = memoryview(mm)[:CONTROL_BYTES].cast("I")
        self._pids = memoryview(mm)[:CONTROL_BYTES].cast("q")
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        raw = torch.frombuffer(mm, dtype=torch.uint8)  # shares the mapping
        self._slots = [[raw[self._slot_offset(p, r):self._slot_offset(p, r) + slot_bytes] for r in range(size)]
                       for p in (0, 1)]
        self._views: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}
        self._seq = 0
        self._all_seen = 0  # every rank is known to have arrived at least here
        self._others = [r for r in range(size) if r != rank]

    # ---- set-up ------------------------------------------------------------------------------
    @classmethod
    def create(cls, rank: int, size: int, group: dist.ProcessGroup, timeout_s: float,
               slot_bytes: int | None = None) -> "ShmCommunicator | None":
        """Collective over the gloo `group`: every rank gets a communicator, or every rank gets
        None (the ranks do not share /dev/shm or cannot see each other's pids)."""
        slot_bytes = slot_bytes or default_slot_bytes(size)
        total = CONTROL_BYTES + 2 * size * slot_bytes
        name = torch.zeros(64, dtype=torch.uint8)
        fd = -1
        if rank == 0:
            path = _create_segment(total)
            if path is not None:
                encoded = path.encode()
                name[:len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
        dist.broadcast(name, src=0, group=group)
        path = bytes(name[name != 0].tolist()).decode()
        mm = None
        if path and _SYS_FUTEX is not None:
            try:
                fd = os.open(path, os.O_RDWR)
                mm = mmap.mmap(fd, total)
            except OSError as e:
                log.info("rank %d cannot map %s (%s): collectives stay on gloo", rank, path, e)
                mm = None
            finally:
                if fd >= 0:
                    os.close(fd)
        ok = mm is not None and memoryview(mm)[:CONTROL_BYTES].cast("I")[_MAGIC_WORD] == MAGIC
        if ok:
            memoryview(mm)[:CONTROL_BYTES].cast("q")[(rank * LINE + 8) // 8] = os.getpid()
        agreed = torch.tensor([int(ok)], dtype=torch.int64)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
        if int(agreed) and mm is not None:
            # Every pid is written now; a peer whose pid we cannot see is in another pid
            # namespace, where liveness checks would lie: stay on gloo then.
            pids = memoryview(mm)[:CONTROL_BYTES].cast("q")
            ok = all(_alive(pids[(r * LINE + 8) // 8]) for r in range(size))
            agreed = torch.tensor([int(ok)], dtype=torch.int64)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
        if rank == 0 and path:
            os.unlink(path)  # mapped where it is needed; nothing is left behind if a rank dies
        if not int(agreed):
            if mm is not None:
                mm.close()
            return None
        return cls(rank, size, mm, slot_bytes, timeout_s)

    def close(self) -> None:
        self._slots, self._views = [], {}
        self._ctl.release()
        self._pids.release()
        try:
            self._mm.close()
        except BufferError:  # a tensor view still alive; the mapping goes with the process
            pass

    # ---- collectives -------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place."""
        if not x.is_contiguous():
            return x.copy_(self.all_reduce(x.contiguous()))
        flat = x.view(-1)
        step = self.slot_bytes // x.element_size()
        for start in range(0, flat.numel(), step):
            part = flat[start:start + step]
            p, k = self._begin(), part.numel()
            self._view(p, self.rank, x.dtype)[:k].copy_(part)
            self._arrive()
            self._wait(self._others)
            torch.add(self._view(p, 0, x.dtype)[:k], self._view(p, 1, x.dtype)[:k], out=part)
            for r in range(2, self.size):
                part.add_(self._view(p, r, x.dtype)[:k])
        return x

    def gather_last_dim(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor | None:
        """Rank 0 gets the ranks' [rows, sizes[r]] slices side by side; the others get None."""
        rows = x.shape[0]
        width = max(sizes)
        step = max(1, self.slot_bytes // (width * x.element_size()))
        out = torch.empty(rows, sum(sizes), dtype=x.dtype) if self.rank == 0 else None
        offsets = [sum(sizes[:r]) for r in range(self.size)]
        for start in range(0, max(rows, 1), step):
            n = min(step, rows - start)
            p = self._begin()
            if self.rank != 0:
                self._view(p, self.rank, x.dtype)[:n * x.shape[1]].view(n, x.shape[1]).copy_(x[start:start + n])
                self._arrive()
                continue
            self._arrive()
            self._wait(self._others)
            out[start:start + n, :sizes[0]] = x[start:start + n]
            for r in range(1, self.size):
                part = self._view(p, r, x.dtype)[:n * sizes[r]].view(n, sizes[r])
                out[start:start + n, offsets[r]:offsets[r] + sizes[r]] = part
        return out

    def broadcast_bytes(self, body: torch.Tensor | None) -> torch.Tensor:
        """Rank 0 passes a 1-D int64 tensor of any length; every rank gets it back (a copy on
        ranks > 0). The length travels in the first element of the first round."""
        cap = self.slot_bytes // 8
        if self.rank == 0:
            n, sent = body.numel(), 0
            while True:
                p = self._begin()
                slot = self._view(p, 0, torch.int64)
                k = min(n - sent, cap - 1) if sent == 0 else min(n - sent, cap)
                if sent == 0:
                    slot[0] = n
                    slot[1:1 + k].copy_(body[:k])
                else:
                    slot[:k].copy_(body[sent:sent + k])
                sent += k
                self._arrive()
                if sent >= n:
                    return body
        out, got, n = None, 0, None
        while True:
            p = self._begin()
            self._arrive()
            self._wait((0,))
            slot = self._view(p, 0, torch.int64)
            if n is None:
                n = int(slot[0])
                out = torch.empty(n, dtype=torch.int64)
                k = min(n, cap - 1)
                out[:k].copy_(slot[1:1 + k])
            else:
                k = min(n - got, cap)
                out[got:got + k].copy_(slot[:k])
            got += k
            if got >= n:
                return out

    # ---- collectives inside a C++ op (workers/csrc/shm_all_reduce.h) --------------------------
    def stack_state(self) -> torch.Tensor:
        """The segment and this rank's counters, for an op that runs all-reduces of its own by
        this protocol; `take_stack_state` reads the counters back after the call."""
        return torch.tensor([self._base, self.rank, self.size, self.slot_bytes, int(self.timeout_s * 1e9),
                             self._seq, self._all_seen, 0], dtype=torch.int64)

    def take_stack_state(self, state: torch.Tensor) -> float:
        """Takes the op's counters back; returns the seconds it waited for peers."""
        seq, all_seen, wait_ns = state[5:8].tolist()
        self._seq, self._all_seen = seq, all_seen
        return wait_ns * 1e-9

    # ---- the protocol ------------------------------------------------------------------------
    def _begin(self) -> int:
        """Next collective; returns its parity once every rank has finished the one that last
        used that parity's slots."""
        self._seq = (self._seq + 1) % _U32
        prev = (self._seq - 1) % _U32
        if not _reached(self._all_seen, prev):
            self._wait(self._others, prev)
        return self._seq & 1

    def _arrive(self) -> None:
        me = self.rank * LINE // 4
        self._ctl[me] = self._seq
        for r in self._others:  # wake a peer asleep on our word
            if self._ctl[r * LINE // 4 + 1] == self.rank + 1:
                _futex(self._base + self.rank * LINE, _FUTEX_WAKE, 0x7FFFFFFF, None)
                break

    def _wait(self, ranks, seq: int | None = None) -> None:
        """Until every rank in `ranks` has arrived at seq (default: this collective). A follower
        waiting for the next plan waits here too: rank 0 sends one (a heartbeat when idle) well
        within the collective timeout."""
        seq = self._seq if seq is None else seq
        ctl = self._ctl
        t0 = None
        for r in ranks:
            word = r * LINE // 4
            if _reached(ctl[word], seq):
                continue
            if t0 is None:
                t0 = time.perf_counter()
            spin_until = t0 + SPIN_S
            while not _reached(ctl[word], seq) and time.perf_counter() < spin_until:
                pass
            if not _reached(ctl[word], seq):
                self._sleep(r, seq, t0)
        if ranks is self._others:
            self._all_seen = seq

    def _sleep(self, r: int, seq: int, t0: float) -> None:
        ctl, word, flag = self._ctl, r * LINE // 4, self.rank * LINE // 4 + 1
        addr = self._base + r * LINE
        nap, next_check = 1e-3, t0 + LIVENESS_S
        while True:
            ctl[flag] = r + 1
            seen = ctl[word]
            if _reached(seen, seq):
                break
            _futex(addr, _FUTEX_WAIT, seen, nap)
            if _reached(ctl[word], seq):
                break
            now = time.perf_counter()
            nap = min(nap * 2, 0.05)
            if now >= next_check:
                next_check = now + LIVENESS_S
                pid = self._pids[(r * LINE + 8) // 8]
                if not _alive(pid):
                    ctl[flag] = 0
                    raise WorkerError(f"tp rank {r} (pid {pid}) exited during a collective")
                if now - t0 > self.timeout_s:
                    ctl[flag] = 0
                    raise WorkerError(f"tp rank {r} (pid {pid}) did not reach collective {seq} within "
                                      f"{self.timeout_s:g} s (hung or stopped)")
        ctl[flag] = 0

    def _view(self, parity: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
        key = (parity, rank, dtype)
        v = self._views.get(key)
        if v is None:
            v = self._views[key] = self._slots[parity][rank].view(dtype)
        return v

    def _slot_offset(self, parity: int, rank: int) -> int:
        return CONTROL_BYTES + (parity * self.size + rank) * self.slot_bytes


def _create_segment(total: int) -> str | None:
    if not os.path.isdir(SHM_DIR) or _SYS_FUTEX is None:
        return None
    path = os.path.join(SHM_DIR, f"tpserve-{os.getpid()}-{secrets.token_hex(6)}")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, total)
            with mmap.mmap(fd, CONTROL_BYTES) as m:
                memoryview(m).cast("I")[_MAGIC_WORD] = MAGIC
        finally:
            os.close(fd)
    except OSError as e:
        log.info("no shared segment in %s (%s): collectives stay on gloo", SHM_DIR, e)
        try:
            os.unlink(path)
        except OSError:
            pass
        return None
    return path


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    try:  # an exited child its parent has not reaped yet still answers kill(0): a zombie
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _futex(addr: int, op: int, val: int, timeout_s: float | None) -> None:
    ts = None
    if timeout_s is not None:
        ts = ctypes.byref(_Timespec(int(timeout_s), int((timeout_s % 1) * 1e9)))
    # ctypes drops the GIL for the call; EAGAIN (the word moved) and ETIMEDOUT are normal.
    _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), op, ctypes.c_uint32(val), ts, None, 0)

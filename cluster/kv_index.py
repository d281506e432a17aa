"""A frontend's index of what every replica's prefix cache holds: block key -> replicas.

Fed only by the engines' own reports (`KVEvents`: keys stored and evicted after each step, and a
`KVDigest` of every key on demand), so two frontends that read the same reports hold the same
index and route alike. Keys are `workers.engine.block_keys` keys under the cluster's salt: the
router computes a prompt's chain with the same function and looks it up here.

Replicas are bits of an int (slot i = bit i): a key's holders are one small int, and a prompt's
longest cached prefix per replica is a walk down its chain that ANDs the holder masks, so a
lookup costs one dict probe per block whatever the replica count.

Bounds and recovery:
- A replica holds at most its block count of keys here (the oldest are dropped past it, which
  only happens if an eviction report was lost).
- A gap in a replica's message numbers (it joined late, a message was lost) or a digest older than
  `digest_period_s` asks for a fresh digest, which replaces that replica's keys.
- `forget` drops a replica that went away, with every key only it held.

Two frontends hold the same index up to the keys each has just routed (`expect`): those are in
its own index a step before the engines report them.
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence

from workers.engine.messages import KVDigest, KVEvents

DIGEST_PERIOD_S = 60.0


class KVIndex:
    def __init__(self, digest_period_s: float = DIGEST_PERIOD_S, clock: Callable[[], float] = time.monotonic):
        self.digest_period_s, self.clock = digest_period_s, clock
        self._lock = threading.Lock()
        self._where: dict[bytes, int] = {}  # key -> bit mask of the replicas holding it
        self._held: dict[str, dict[bytes, None]] = {}  # replica -> its keys, oldest first
        self._slot: dict[str, int] = {}  # replica -> bit number
        self._free_slots: list[int] = []
        self._capacity: dict[str, int] = {}
        self._seq: dict[str, int] = {}  # last KVEvents number applied, per replica
        self._digested: dict[str, float] = {}  # when the last digest was applied
        self._asked: dict[str, float] = {}  # a digest was asked for and has not come back
        self.gaps = 0  # message gaps seen, since start

    # ---- replicas -------------------------------------------------------------------------------
    def slot(self, replica_id: str) -> int:
        """The replica's bit, given it on first use (only the router adds replicas; reports of a
        replica without a slot are dropped)."""
        with self._lock:
            return self._slot_locked(replica_id)

    def _slot_locked(self, replica_id: str) -> int:
        s = self._slot.get(replica_id)
        if s is None:
            s = self._free_slots.pop() if self._free_slots else len(self._slot) + len(self._free_slots)
            self._slot[replica_id] = s
            self._held[replica_id] = {}
        return s

    def forget(self, replica_id: str) -> None:
        """The replica went away: drop its keys and free its slot."""
        with self._lock:
            s = self._slot.pop(replica_id, None)
            if s is None:
                return
            self._clear_locked(replica_id, s)
            del self._held[replica_id]
            for d in (self._capacity, self._seq, self._digested, self._asked):
                d.pop(replica_id, None)
            self._free_slots.append(s)

    def _clear_locked(self, replica_id: str, s: int) -> None:
        bit = 1 << s
        for k in self._held[replica_id]:
            m = self._where.get(k, 0) & ~bit
            if m:
                self._where[k] = m
            else:
                self._where.pop(k, None)
        self._held[replica_id] = {}

    # ---- reports ---------------------------------------------------------------------------------
    def apply(self, replica_id: str, ev: KVEvents) -> bool:
        """Apply one replica's KVEvents; True when the caller should fetch a digest for it (a gap,
        a first message, or a digest older than the period). Called on that replica's reader."""
        with self._lock:
            s = self._slot.get(replica_id)
            if s is None:  # a late message from a replica already forgotten: no ghost slot
                return False
            if ev.load.num_blocks:
                self._capacity[replica_id] = ev.load.num_blocks
            last = self._seq.get(replica_id)
            self._seq[replica_id] = ev.seq
            gap = last is None or ev.seq != last + 1
            self.gaps += gap and last is not None
            self._remove_locked(replica_id, s, ev.removed)
            self._store_locked(replica_id, s, ev.stored)
            now = self.clock()
            stale = gap or now - self._digested.get(replica_id, -1e18) > self.digest_period_s
            if stale and now - self._asked.get(replica_id, -1e18) > 10.0:  # one request in flight
                self._asked[replica_id] = now
                return True
            return False

    def apply_digest(self, replica_id: str, d: KVDigest) -> None:
        """Replace the replica's keys with a digest (messages numbered <= d.seq are in it)."""
        with self._lock:
            s = self._slot.get(replica_id)
            if s is None:  # forgotten while the digest was on its way
                return
            self._clear_locked(replica_id, s)
            self._capacity[replica_id] = d.num_blocks
            self._store_locked(replica_id, s, d.keys)
            self._seq[replica_id] = max(self._seq.get(replica_id, d.seq), d.seq)
            self._digested[replica_id] = self.clock()
            self._asked.pop(replica_id, None)

    def expect(self, replica_id: str, keys: Sequence[bytes]) -> None:
        """The router just placed a prompt with these keys on the replica: count them as held now,
        before the engine computes them, so the next request with the same prefix follows this
        one instead of computing the prefix a second time elsewhere (as SGLang's router inserts at
        routing time). The engine's own report confirms them; a digest drops any it never stored."""
        with self._lock:
            if replica_id in self._slot:
                self._store_locked(replica_id, self._slot[replica_id], keys)

    def digest_failed(self, replica_id: str) -> None:
        with self._lock:
            self._asked.pop(replica_id, None)

    def _store_locked(self, replica_id: str, s: int, keys: Sequence[bytes]) -> None:
        bit, held = 1 << s, self._held[replica_id]
        cap = self._capacity.get(replica_id)
        for k in keys:
            if k in held:
                continue
            held[k] = None
            self._where[k] = self._where.get(k, 0) | bit
        if cap is not None and len(held) > cap:  # only after a lost eviction report: drop the oldest
            self._remove_locked(replica_id, s, list(held)[:len(held) - cap])

    def _remove_locked(self, replica_id: str, s: int, keys: Sequence[bytes]) -> None:
        bit, held = 1 << s, self._held[replica_id]
        for k in keys:
            if held.pop(k, 1) is not None:
                continue
            m = self._where.get(k, 0) & ~bit
            if m:
                self._where[k] = m
            else:
                self._where.pop(k, None)

    # ---- lookups ---------------------------------------------------------------------------------
    def match(self, keys: Sequence[bytes], among: int) -> dict[int, int]:
        """For the replicas in the bit mask `among`: slot -> how many leading blocks of `keys` it
        holds (replicas with none are left out)."""
        out: dict[int, int] = {}
        alive = among
        where = self._where
        with self._lock:
            for i, k in enumerate(keys):
                now = alive & where.get(k, 0)
                if now != alive:
                    dropped = alive & ~now
                    if i:
                        while dropped:
                            low = dropped & -dropped
                            out[low.bit_length() - 1] = i
                            dropped ^= low
                    alive = now
                    if not alive:
                        break
            else:
                n = len(keys)
                while alive and n:
                    low = alive & -alive
                    out[low.bit_length() - 1] = n
                    alive ^= low
        return out

    def holders(self, key: bytes) -> set[str]:
        with self._lock:
            m = self._where.get(key, 0)
            return {rid for rid, s in self._slot.items() if m >> s & 1}

    def keys_of(self, replica_id: str) -> set[bytes]:
        with self._lock:
            return set(self._held.get(replica_id, ()))

    @property
    def size(self) -> int:
        """Entries held (a key held by two replicas counts twice)."""
        with self._lock:
            return sum(len(h) for h in self._held.values())

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {rid: len(h) for rid, h in self._held.items()}

    def memory_bytes(self) -> int:
        """What the index holds in memory: its dicts, their keys and masks (a key object shared
        by several replicas counted once)."""
        with self._lock:
            seen, total = set(), sys.getsizeof(self._where)
            for k, m in self._where.items():
                total += sys.getsizeof(m)
                if id(k) not in seen:
                    seen.add(id(k))
                    total += sys.getsizeof(k)
            return total + sum(sys.getsizeof(h) for h in self._held.values())

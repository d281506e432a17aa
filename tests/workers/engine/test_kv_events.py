"""The engine's KV events: the keys it reports are the keys the router computes (same function,
same salt, across processes), evictions are reported, and a digest equals the events' sum."""
from __future__ import annotations

import threading
import time

from cluster.router import Router
from workers.engine.block_keys import BlockKeyer, new_salt
from workers.engine.core import EngineConfig
from workers.engine.messages import KVEvents
from workers.engine.sampling_params import SamplingParams
from workers.launcher import LocalWorkerGroup
from workers.worker import WorkerSpec

BS = 16


class Collector:
    def __init__(self):
        self.events: list[KVEvents] = []
        self.lock = threading.Lock()

    def __call__(self, ev: KVEvents) -> None:
        with self.lock:
            self.events.append(ev)

    def held(self) -> set[bytes]:
        """Keys stored and not since removed, in report order."""
        keys: set[bytes] = set()
        with self.lock:
            for ev in self.events:
                keys -= set(ev.removed)
                keys |= set(ev.stored)
        return keys

    def wait(self, after: int, pred, timeout_s: float = 10) -> KVEvents:
        """The first report past the first `after` ones for which pred holds."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                hit = next((ev for ev in self.events[after:] if pred(ev)), None)
            if hit is not None:
                return hit
            time.sleep(0.02)
        raise AssertionError("no such report from the engine")

    def settle(self, after: int) -> None:
        """Until the reports past the first `after` show work, then an idle engine."""
        busy = self.wait(after, lambda ev: ev.load.running or ev.load.waiting or ev.stored)
        with self.lock:
            start = self.events.index(busy)
        self.wait(start, lambda ev: ev.load.running == ev.load.waiting == 0)


def test_a_replica_in_other_processes_reports_the_keys_the_router_computes(tiny_llama_dir):
    salt = new_salt()
    # 10 blocks of KV: the third prompt below evicts the first one's cached blocks.
    spec = WorkerSpec(str(tiny_llama_dir), tp_size=2, kv_cache_memory=10 * 2 * 2 * BS * 2 * 8 * 4)
    group = LocalWorkerGroup(spec, EngineConfig(max_num_seqs=4, block_key_salt=salt))
    try:
        assert group.engine.call("info")["num_blocks"] == 10
        seen = Collector()
        group.engine.on_kv_events = seen
        router = Router(None, 4, 4, keyer=BlockKeyer(salt), block_size=BS)
        one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        a = list(range(3, 3 + 70))  # 4 full blocks + 6 tokens
        group.engine.generate([a], one)
        seen.settle(0)
        assert seen.held() == set(router.block_keys(a, None)), "engine and router disagree on a's keys"
        assert [ev.seq for ev in seen.events] == list(range(seen.events[0].seq, seen.events[-1].seq + 1))

        # A tenant's cache_salt roots the chain elsewhere, in the engine and in the router alike.
        b = list(range(100, 100 + 40))
        n = len(seen.events)
        group.engine.generate([b], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, cache_salt="t1"))
        seen.settle(n)
        b_keys = router.block_keys(b, "t1")
        assert set(b_keys) <= seen.held() and not set(b_keys) & set(router.block_keys(b, None))

        # A third prompt needs more free blocks than remain: a's cached blocks are evicted, and said so.
        c = list(range(150, 150 + 100))
        n = len(seen.events)
        group.engine.generate([c], one)
        seen.settle(n)
        removed = {k for ev in seen.events for k in ev.removed}
        assert removed and removed <= set(router.block_keys(a, None)) | set(b_keys)
        digest = group.engine.call("kv_digest")
        assert set(digest.keys) == seen.held()
        assert digest.seq == seen.events[-1].seq and digest.num_blocks == 10 and digest.block_size == BS
        # The load figure: idle now, so nothing queued; while a request runs, its tokens are counted.
        assert seen.events[-1].load.tokens == 0
        n = len(seen.events)
        stream = group.engine.add_request(list(range(3, 3 + 30)), SamplingParams(max_tokens=50, ignore_eos=True))
        running = seen.wait(n, lambda ev: ev.load.running == 1).load
        assert 0 < running.decode_tokens < 50 and running.added_by("") == 4  # the four adds of this client
        assert len(stream.result().token_ids) == 50
    finally:
        group.close()

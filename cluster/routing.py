"""Which replica serves a request: the routing policies, free of Ray so that the simulator drives
the same code as the frontend.

kv-aware (the default). For each ready replica r:

    cached(r)  = block_size x the leading blocks of the prompt that r's prefix cache holds
                 (the KVIndex, fed by r's engine), at most the blocks a prefix match may use
    new(r)     = prompt tokens - cached(r)                  r's prefill work for this request
    load(r)    = r's engine: prompt tokens still to prefill + tokens its requests may still
                 generate (EngineLoad, the same figure for every frontend)
                 + what this frontend placed on r that the engine had not yet taken
    score(r)   = prefill_weight x new(r) + load(r)

and the replica with the least score serves (ties: the least load, then round robin). The load
counts every token a replica's requests may still generate, but a step decodes all running
requests at once, so a token of load delays a new request far less than a prompt token it must
prefill itself. Hence a prefill weight above 1: 4 by default, measured (docs/routing.md: on the
multi-tenant workload, weight 1 gave TTFT p50 1,029 ms, 4 gave 593 ms, 8 gave 548 ms with a worse
p90).

Balance guard: one hot prefix makes cached(r) large for one replica, and new work would pile on it
while others idle. When the chosen replica's load exceeds

    balance_rel x min_r load(r) + balance_abs_tokens

the least-loaded replica serves instead (the best cached among the least loaded). The defaults
(1.5x plus 1,024 tokens: two steps of the default prefill budget) allow a cache hit to queue
behind a little work, not behind a replica's worth.

least-load: the least load(r). round-robin: in turn. Both ignore the cache.
"""
from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from cluster.kv_index import KVIndex
from workers.engine.messages import EngineLoad
from workers.errors import ConfigError

POLICIES = ("kv-aware", "least-load", "round-robin")
REASONS = ("cache", "load", "balance", "round-robin")


@dataclass(slots=True)
class RoutingConfig:
    policy: str = "kv-aware"
    prefill_weight: float = 4.0
    balance_rel: float = 1.5
    balance_abs_tokens: int = 1024

    def validate(self) -> "RoutingConfig":
        if self.policy not in POLICIES:
            raise ConfigError("routing", f"{self.policy!r} is not one of {', '.join(POLICIES)}")
        if not self.prefill_weight >= 0:
            raise ConfigError("routing-prefill-weight", f"must be >= 0, got {self.prefill_weight}")
        if not self.balance_rel >= 1:
            raise ConfigError("balance-rel", f"must be >= 1, got {self.balance_rel}")
        if self.balance_abs_tokens < 0:
            raise ConfigError("balance-abs-tokens", f"must be >= 0, got {self.balance_abs_tokens}")
        return self


@dataclass(frozen=True, slots=True)
class Decision:
    index: int  # into the candidate list
    reason: str  # cache | load | balance | round-robin
    cached_tokens: int  # of this prompt, on the chosen replica (by the index)


class RoutingPolicy:
    def __init__(self, config: RoutingConfig, index: KVIndex):
        self.config, self.index = config.validate(), index
        self._turn = itertools.count()

    def choose(self, slots: Sequence[int], loads: Sequence[int], keys: Sequence[bytes], prompt_len: int,
               block_size: int, among: int | None = None) -> Decision:
        """Among the ready replicas, given as their KVIndex slots and loads (tokens, as defined
        above), in one order; `keys`: the prompt's block keys (computed off the event loop, with
        tokenizing); `among`: `slot_mask(slots)`, if the caller keeps it. The decision's index is
        into that order; ties go round robin from a start that turns with each decision."""
        n = len(slots)
        turn = next(self._turn)
        if self.config.policy == "round-robin":
            return Decision(turn % n, "round-robin", 0)
        start = turn % n
        least = min(loads)
        # The least-loaded replica, first from the rotating start (C-level scans: this decision
        # runs per request over every replica, and a Python loop over 64 of them was half of it).
        try:
            idle = loads.index(least, start)
        except ValueError:
            idle = loads.index(least)
        if self.config.policy == "least-load":
            return Decision(idle, "load", 0)
        usable = (prompt_len - 1) // block_size if block_size else 0
        hits: dict[int, int] = {}
        if usable and keys:
            hits = self.index.match(keys[:usable], slot_mask(slots) if among is None else among)
        # score(r) - prefill_weight x prompt = load(r) - saved x cached blocks. A replica holding
        # none of the prompt scores its load, so `idle` beats or ties (and precedes in the
        # rotation) every other such replica: only it and the replicas in `hits` can win.
        saved = self.config.prefill_weight * block_size
        best = idle
        best_key = (least - saved * hits.get(slots[idle], 0), least, (idle - start) % n)
        held = [(slots.index(slot), h) for slot, h in hits.items()]
        for i, h in held:
            key = (loads[i] - saved * h, loads[i], (i - start) % n)
            if key < best_key:
                best, best_key = i, key
        if loads[best] > self.config.balance_rel * least + self.config.balance_abs_tokens:
            # The least-loaded replicas; of those, the one that caches most of this prompt.
            guard, most = idle, hits.get(slots[idle], 0)
            for i, h in held:
                if loads[i] == least and (h > most or (h == most and (i - start) % n < (guard - start) % n)):
                    guard, most = i, h
            return Decision(guard, "balance", most * block_size)
        cached = hits.get(slots[best], 0) * block_size
        return Decision(best, "cache" if cached else "load", cached)


class LoadBoard:
    """The loads of one router's replicas in one list, indexed by KVIndex slot. Each replica's book
    writes its entry when its engine reports and when the router places work there, so a routing
    decision reads a list instead of asking every replica for its load: over 64 replicas that read
    was the floor of the decision's time (docs/routing.md)."""

    __slots__ = ("loads",)

    def __init__(self):
        self.loads: list[int] = []

    def book(self, slot: int) -> "ReplicaBook":
        """A new book for the replica at `slot` (a freed slot is reused: its entry starts at 0)."""
        if slot >= len(self.loads):
            self.loads.extend([0] * (slot + 1 - len(self.loads)))
        self.loads[slot] = 0
        return ReplicaBook(self, slot)


def slot_mask(slots: Sequence[int]) -> int:
    """The KVIndex bits of these replicas."""
    mask = 0
    for slot in slots:
        mask |= 1 << slot
    return mask


class ReplicaBook:
    """One router's books on one replica: the engine's load as last reported, plus what this
    router placed there that the engine has not yet counted. The engine's report (EngineLoad, the
    same figure for every frontend) names the highest AddRequest number it has taken from each
    client; a placement numbered above that is work the router adds on its own, or the next request
    would see an idle replica that is not. Ray-free: the router and the simulator keep the same
    books. Reports arrive on the replica's reader thread and placements on the router's, hence the
    lock."""

    __slots__ = ("_board", "_slot", "_lock", "_unacked", "_unacked_tokens", "_engine_tokens", "_taken", "_retired",
                 "in_flight", "routed")

    def __init__(self, board: LoadBoard | None = None, slot: int = 0):
        if board is None:  # a book of its own (tests, one replica)
            board = LoadBoard()
            board.loads.append(0)
        self._board, self._slot = board, slot
        self._lock = threading.Lock()
        self._unacked: deque[tuple[int, int]] = deque()  # (AddRequest number, tokens of work)
        self._unacked_tokens = 0
        self._engine_tokens = 0  # the engine's load as last reported
        self._taken = 0  # the highest AddRequest number of this router the engine has reported taken
        self._retired = False
        self.in_flight = 0  # placements not yet closed
        self.routed = 0  # placements since start

    def report(self, engine: EngineLoad, client_id: str) -> None:
        """The engine reported its load (`client_id`: this router's client of the engine)."""
        with self._lock:
            self._taken = taken = engine.added_by(client_id)
            u = self._unacked
            while u and u[0][0] <= taken:
                self._unacked_tokens -= u.popleft()[1]
            # EngineLoad.tokens spelled out: this runs on every step of every replica.
            self._engine_tokens = engine.prefill_tokens + engine.decode_tokens
            self._publish()

    def placed(self, number: int, work: int) -> None:
        """AddRequest `number` carries `work` tokens (uncached prompt + tokens it may generate)."""
        with self._lock:
            # Its engine may have reported taking it already (a report can overtake this call).
            if number > self._taken:
                self._unacked.append((number, work))
                self._unacked_tokens += work
                self._publish()
            self.in_flight += 1
            self.routed += 1

    def _publish(self) -> None:
        if not self._retired:
            self._board.loads[self._slot] = self._engine_tokens + self._unacked_tokens

    def retire(self) -> None:
        """The replica left the router: its slot may go to another replica, so write no more."""
        with self._lock:
            self._retired = True

    def closed(self) -> None:
        self.in_flight -= 1

    @property
    def load(self) -> int:
        """The engine's load plus the placements it has not yet counted."""
        return self._engine_tokens + self._unacked_tokens

    @property
    def unacked(self) -> int:
        """Placements the engine has not yet counted."""
        return len(self._unacked)

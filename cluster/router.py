"""Scheduling requests onto replicas, and a bounded admission queue (beyond it, refuse at once).

The router learns the replica set from the controller and keeps one engine client per replica
(tokens arrive as one batched message per engine step). Each client also hears its engine's
KVEvents (prefix-cache keys stored and evicted, and the engine's load), which feed the KVIndex;
the choice itself is `cluster.routing` (kv-aware, least-load or round-robin).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from cluster.kv_index import KVIndex
from cluster.replica import engine_client
from cluster.routing import LoadBoard, ReplicaBook, RoutingConfig, RoutingPolicy
from workers.defaults import BLOCK_SIZE
from workers.engine.block_keys import BlockKeyer
from workers.engine.client import EngineClient, RequestStream
from workers.engine.messages import KVEvents
from workers.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class Unavailable(Exception):
    """No replica is ready."""


class Overloaded(Exception):
    """The admission queue is full."""


class AlreadyExists(Exception):
    """A request with this id is already in flight on this frontend."""


@dataclass(slots=True, eq=False)
class ReplicaHandle:
    replica_id: str
    rank0: object
    client: EngineClient
    workers: list[dict]
    tp_size: int
    slot: int = 0  # its bit in the KVIndex, and its entry on the router's LoadBoard
    book: ReplicaBook = field(default_factory=ReplicaBook)  # the router gives it one on its board

    def load(self) -> int:
        """The engine's own load plus this frontend's placements it has not yet counted."""
        return self.book.load


class Placement:
    """One request on one replica: its stream, and its place in the replica's book. The request
    path calls `abort` if it stops early, and `close` once at the end."""

    __slots__ = ("handle", "stream", "request_id", "reason", "cached_tokens", "_closed")

    def __init__(self, handle: ReplicaHandle, stream: RequestStream, request_id: str, reason: str,
                 cached_tokens: int):
        self.handle, self.stream, self.request_id = handle, stream, request_id
        self.reason, self.cached_tokens = reason, cached_tokens
        self._closed = False

    @property
    def replica_id(self) -> str:
        return self.handle.replica_id

    def abort(self) -> bool:
        """Stop it in the engine now (cancelled, past its deadline, or its consumer left). Only a
        request still live there: an abort of a finished one would refuse a retry of its id."""
        if self.stream.finished:
            return False
        self.handle.client.abort(self.request_id)
        return True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.handle.book.closed()


class Router:
    def __init__(self, controller, max_num_seqs: int, max_queue_len: int, routing: RoutingConfig | None = None,
                 keyer: BlockKeyer | None = None, block_size: int = BLOCK_SIZE,
                 client_factory: Callable[[object], EngineClient] | None = None):
        self.controller = controller
        self.max_num_seqs, self.max_queue_len = max_num_seqs, max_queue_len
        self.routing = (routing or RoutingConfig()).validate()
        self.keyer, self.block_size = keyer, block_size
        self.index = KVIndex()
        self.board = LoadBoard()
        self.policy = RoutingPolicy(self.routing, self.index)
        self.replicas: dict[str, ReplicaHandle] = {}
        self.active: set[str] = set()  # ids of the admitted requests: unique per frontend
        self.refused = 0
        self.decisions: Counter = Counter()  # by reason
        self.draining = False
        self.reconnects = 0  # dead channels to still-listed replicas rebuilt, since start
        self.restarts = 0  # the controller's count of replicas it replaced, as last read
        self.client_factory: Callable[[object], EngineClient] = client_factory or engine_client

    def list_replicas(self) -> list[dict]:
        return ray.get(self.controller.list_replicas.remote(), timeout=30)

    # ---- replica set --------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Sync with the controller's replica list (blocking; run it off the event loop)."""
        listed = self.list_replicas()
        ready = {r["replica_id"]: r for r in listed if r["state"] == "ready"}
        for rid in list(self.replicas):
            if rid not in ready:  # replaced or stopped: its open streams end now and resume elsewhere
                h = self.replicas.pop(rid)
                h.book.retire()
                h.client.fail(f"replica {rid} was taken out of service")
                h.client.close(timeout_s=0.1)  # (no detach: the replica is gone)  # a reader stuck on a hung actor ends at its own timeout
                self.index.forget(rid)
        for rid, r in ready.items():
            old = self.replicas.get(rid)
            if old is not None and old.client.dead is not None:
                # Our channel failed but the controller still calls the replica ready (a transient
                # error outlasted the client's retries): a new channel with a new client id. The
                # old client's streams already ended and resume elsewhere; detach it so the
                # engine aborts what they left running.
                log.warning("replica %s: channel failed (%s) but the controller lists it ready; reconnecting",
                            rid, old.client.dead)
                with contextlib.suppress(Exception):
                    old.client.detach()
                old.client.close(timeout_s=0.1)
                old.book.retire()
                self.reconnects += 1
                old = None
            if old is None:
                self.add_replica(ReplicaHandle(rid, r["rank0"], self.client_factory(r["rank0"]), r["workers"],
                                               r["tp_size"]))

    def add_replica(self, h: ReplicaHandle) -> None:
        h.slot = self.index.slot(h.replica_id)
        h.book = self.board.book(h.slot)
        h.client.on_kv_events = lambda ev, h=h: self._on_kv_events(h, ev)
        # What the engine reported before the listener was set (reports follow each busy step).
        h.book.report(h.client.load, h.client.client_id)
        self.replicas[h.replica_id] = h

    def _on_kv_events(self, h: ReplicaHandle, ev: KVEvents) -> None:
        """On the replica's reader thread: book the load; index the events; fetch a digest when
        they have a gap."""
        h.book.report(ev.load, h.client.client_id)
        if not self.index.apply(h.replica_id, ev):
            return

        def digested(fut, rid=h.replica_id):
            if fut.exception() is None and rid in self.replicas:
                self.index.apply_digest(rid, fut.result())
            else:
                self.index.digest_failed(rid)

        h.client.call_async("kv_digest").add_done_callback(digested)

    @property
    def ready(self) -> list[ReplicaHandle]:
        return [h for h in list(self.replicas.values()) if h.client.dead is None]

    def served_max_model_len(self) -> int | None:
        """The context every ready replica serves (each rank reports it at start); None if none does."""
        lens = [w["max_model_len"] for h in self.ready for w in h.workers[:1] if "max_model_len" in w]
        return min(lens) if lens else None

    def capacity(self) -> int:
        return len(self.ready) * self.max_num_seqs + self.max_queue_len

    # ---- routing --------------------------------------------------------------------------------------
    def block_keys(self, prompt_ids: list[int], cache_salt: str | None) -> list[bytes]:
        """The prompt's block keys, as its replica's engine will compute them (run off the event
        loop: hashing is not part of the routing decision)."""
        if self.keyer is None or self.routing.policy != "kv-aware":
            return []
        return self.keyer.keys(prompt_ids, self.block_size, cache_salt)

    @property
    def in_flight(self) -> int:
        return len(self.active)

    def admit(self, request_id: str) -> None:
        """Count a new request in, or refuse it: draining, its id already in flight, or the
        admission bound reached. Every admitted request ends with exactly one `done(request_id)`;
        a refused one was never counted. Runs before the prompt is even tokenized."""
        if self.draining:
            raise Unavailable("the server is draining; retry on another frontend")
        if not self.ready:
            raise Unavailable("no replica is ready")
        if request_id in self.active:
            raise AlreadyExists(f"request_id: {request_id!r} is already in flight on this server")
        if self.in_flight >= self.capacity():
            self.refused += 1
            raise Overloaded(f"{self.in_flight} requests in flight; the admission bound is {self.capacity()}")
        self.active.add(request_id)

    def place(self, prompt_ids: list[int], keys: list[bytes], params: SamplingParams, request_id: str,
              loop: asyncio.AbstractEventLoop, output_prefix: list[int] | None = None) -> Placement:
        """Send an admitted request (or the rest of a resumed one) to the replica the policy picks."""
        ready = self.ready
        if not ready:
            raise Unavailable("no replica is ready")
        slots = [h.slot for h in ready]
        board = self.board.loads
        decision = self.policy.choose(slots, [board[s] for s in slots], keys, len(prompt_ids), self.block_size)
        h = ready[decision.index]
        stream = h.client.add_request(prompt_ids, params, request_id=request_id, loop=loop,
                                      output_prefix=output_prefix)
        # Charged only once the replica has the request: a refusal above leaves no count behind.
        if keys:
            self.index.expect(h.replica_id, keys[:(len(prompt_ids) - 1) // self.block_size])
        remaining = params.max_tokens - len(output_prefix or ())
        h.book.placed(h.client.sent, len(prompt_ids) - decision.cached_tokens + remaining)
        self.decisions[decision.reason] += 1
        return Placement(h, stream, request_id, decision.reason, decision.cached_tokens)

    def done(self, request_id: str) -> None:
        self.active.discard(request_id)

    def status(self) -> list[dict]:
        out, sizes = [], self.index.sizes()
        for h in list(self.replicas.values()):
            try:
                st = h.client.call("stats", timeout=5) if h.client.dead is None else h.client.stats
            except Exception:
                st = h.client.stats
            out.append({"replica_id": h.replica_id, "state": "ready" if h.client.dead is None else "unhealthy",
                        "tp_size": h.tp_size, "workers": h.workers, "stats": st, "routed": h.book.routed,
                        "in_flight": h.book.in_flight, "load_tokens": h.load(),
                        "index_blocks": sizes.get(h.replica_id, 0)})
        return out

    def controller_info(self) -> dict:
        """The controller's counters (restarts, target); empty if it does not answer in time."""
        try:
            info = ray.get(self.controller.info.remote(), timeout=5)
        except Exception:
            return {}
        self.restarts = info.get("restarts", self.restarts)
        return info

    def close(self) -> None:
        """Leave every replica: what this frontend still has running there is aborted."""
        for h in list(self.replicas.values()):
            h.client.close(detach=True)

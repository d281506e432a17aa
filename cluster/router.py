"""Scheduling requests onto replicas: least outstanding work, prefix affinity on ties, and a
bounded admission queue (beyond it, refuse at once).

Outstanding work of a replica = prompt tokens of its requests not yet answered + tokens they may
still generate. The router learns the replica set from the controller and keeps one engine client
per replica (tokens arrive as one batched message per engine step).
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import ray

from cluster.replica import engine_client
from workers.engine.client import EngineClient, RequestStream
from workers.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

AFFINITY_TOKENS = 64  # prefix length that identifies a "same system prompt" for affinity


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
    outstanding: int = 0
    in_flight: int = 0
    routed: int = 0
    prefixes: OrderedDict = field(default_factory=OrderedDict)  # recent prompt-prefix keys, LRU

    def remember(self, key: int) -> None:
        self.prefixes[key] = None
        self.prefixes.move_to_end(key)
        while len(self.prefixes) > 256:
            self.prefixes.popitem(last=False)


class Router:
    def __init__(self, controller, max_num_seqs: int, max_queue_len: int):
        self.controller = controller
        self.max_num_seqs, self.max_queue_len = max_num_seqs, max_queue_len
        self.replicas: dict[str, ReplicaHandle] = {}
        self.active: set[str] = set()  # ids of the admitted requests: unique per frontend
        self.refused = 0
        self.draining = False

    # ---- replica set --------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Sync with the controller's replica list (blocking; run it off the event loop)."""
        listed = ray.get(self.controller.list_replicas.remote(), timeout=30)
        ready = {r["replica_id"]: r for r in listed if r["state"] == "ready"}
        for rid in list(self.replicas):
            if rid not in ready:  # replaced or stopped: its open streams end now and resume elsewhere
                h = self.replicas.pop(rid)
                h.client.fail(f"replica {rid} was taken out of service")
                h.client.close(timeout_s=0.1)  # (no detach: the replica is gone)  # a reader stuck on a hung actor ends at its own timeout
        for rid, r in ready.items():
            if rid not in self.replicas:
                self.replicas[rid] = ReplicaHandle(rid, r["rank0"], engine_client(r["rank0"]), r["workers"], r["tp_size"])

    @property
    def ready(self) -> list[ReplicaHandle]:
        return [h for h in list(self.replicas.values()) if h.client.dead is None]

    def capacity(self) -> int:
        return len(self.ready) * self.max_num_seqs + self.max_queue_len

    # ---- routing --------------------------------------------------------------------------------------
    def pick(self, prompt_ids: list[int]) -> ReplicaHandle:
        ready = self.ready
        if not ready:
            raise Unavailable("no replica is ready")
        key = hash(tuple(prompt_ids[:AFFINITY_TOKENS]))
        least = min(h.outstanding for h in ready)
        tied = [h for h in ready if h.outstanding == least]
        for h in tied:
            if key in h.prefixes:
                return h
        return min(tied, key=lambda h: h.routed)

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

    def place(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
              loop: asyncio.AbstractEventLoop, output_prefix: list[int] | None = None,
              ) -> tuple[ReplicaHandle, RequestStream, int]:
        """Send an admitted request (or the rest of a resumed one) to a replica. Returns the
        handle, the stream and the work charged to the replica (give it back with `release`)."""
        h = self.pick(prompt_ids)
        stream = h.client.add_request(prompt_ids, params, request_id=request_id, loop=loop,
                                      output_prefix=output_prefix)
        # Charged only once the replica has the request: a refusal above leaves no count behind.
        h.remember(hash(tuple(prompt_ids[:AFFINITY_TOKENS])))
        work = len(prompt_ids) + params.max_tokens  # prefix tokens move from "to generate" to "to prefill"
        h.outstanding += work
        h.in_flight += 1
        h.routed += 1
        return h, stream, work

    def progress(self, h: ReplicaHandle, tokens: int) -> None:
        h.outstanding -= tokens

    def release(self, h: ReplicaHandle, remaining: int) -> None:
        h.outstanding -= remaining
        h.in_flight -= 1

    def done(self, request_id: str) -> None:
        self.active.discard(request_id)

    def status(self) -> list[dict]:
        out = []
        for h in list(self.replicas.values()):
            try:
                st = h.client.call("stats", timeout=5) if h.client.dead is None else h.client.stats
            except Exception:
                st = h.client.stats
            out.append({"replica_id": h.replica_id, "state": "ready" if h.client.dead is None else "unhealthy",
                        "tp_size": h.tp_size, "workers": h.workers, "stats": st, "routed": h.routed,
                        "in_flight": h.in_flight, "outstanding": h.outstanding})
        return out

    def controller_info(self) -> dict:
        """The controller's counters (restarts, target); empty if it does not answer in time."""
        try:
            return ray.get(self.controller.info.remote(), timeout=5)
        except Exception:
            return {}

    def close(self) -> None:
        """Leave every replica: what this frontend still has running there is aborted."""
        for h in list(self.replicas.values()):
            h.client.close(detach=True)

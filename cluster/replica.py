"""One replica under Ray: a placement group of tp bundles packed on one node, one actor per rank.

Each `RankActor` hosts one rank through `workers.rank.run_rank`; rank 0's runs the engine loop on
a thread. Frontends talk to rank 0 only: `put` (add / abort / call / detach messages) and `poll`
(a batch of output messages). Each frontend is a client with its own outbox, so frontends sharing
a replica never take each other's outputs. Actors are threaded so a poll can wait while a step
runs, and a health check is answered while a step hangs.
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from workers import OPENMP_ENV
from workers.engine.client import EngineClient
from workers.engine.core import EngineConfig
from workers.engine.loop import drain
from workers.engine.messages import Detach, Fatal, InboxMessage, KVEvents, OutboxMessage, Shutdown
from workers.rank import Rank, run_rank
from workers.worker import WorkerSpec

log = logging.getLogger(__name__)

# A client (frontend) that has not polled for this long is gone: its requests are aborted and its
# outbox dropped. A live client polls at least every poll timeout (0.5 s).
CLIENT_TTL_S = 30.0
# A failed rank 0 waits this long at most for its clients to take the Fatal before it exits.
FATAL_DELIVERY_S = 3.0
FATAL_REPLY_S = 0.3
# How long a client retries rank 0's transient errors before it calls the replica lost.
TRANSIENT_RETRY_S = 10.0


class ClientOutboxes:
    """Rank 0's outbox under Ray: one queue per client. Step outputs and call results go to the
    client they name; KVEvents to every present client; a Fatal to every client, present and future."""

    def __init__(self):
        self._queues: dict[str, queue.Queue] = {}
        self._last_poll: dict[str, float] = {}
        self._batches: dict[str, tuple[int, list]] = {}  # the last batch sent to each client
        self._poll_locks: dict[str, threading.Lock] = {}
        self._fatal: Fatal | None = None
        self._lock = threading.Lock()

    def _queue(self, client_id: str) -> queue.Queue:
        with self._lock:
            q = self._queues.get(client_id)
            if q is None:
                q = self._queues[client_id] = queue.Queue()
                self._last_poll[client_id] = time.monotonic()
                if self._fatal is not None:
                    q.put(self._fatal)
            return q

    def put(self, msg: OutboxMessage) -> None:  # the engine loop's thread
        if isinstance(msg, Fatal) or (isinstance(msg, KVEvents) and msg.client_id is None):
            with self._lock:  # a client that joins later learns the cache from a digest
                if isinstance(msg, Fatal):
                    self._fatal = msg
                queues = list(self._queues.values())
            for q in queues:
                q.put(msg)
        else:
            self._queue(msg.client_id).put(msg)

    def poll(self, client_id: str, timeout: float, taken: int = -1) -> tuple[int, list[OutboxMessage]]:
        """(batch number, messages). `taken`: the last batch number the client received. A poll
        whose reply was lost (a transient actor error, a get that timed out) is answered again with
        the same batch, so a retry loses no message."""
        q = self._queue(client_id)
        with self._lock:
            lock = self._poll_locks.setdefault(client_id, threading.Lock())
        with lock:  # a retry may arrive while the poll it replaces still waits
            self._last_poll[client_id] = time.monotonic()
            number, batch = self._batches.get(client_id, (0, []))
            if batch and taken < number:
                return number, batch
            batch = drain(q, timeout)
            if batch:
                number += 1
            self._batches[client_id] = (number, batch)
            return number, batch

    def wait_taken(self, timeout_s: float) -> bool:
        """Until every client has taken what is queued for it (rank 0 calls this before exiting,
        so clients learn it failed, not just that its channel closed); False on timeout."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with self._lock:
                queues = list(self._queues.values())
            if all(q.empty() for q in queues):
                time.sleep(FATAL_REPLY_S)  # the poll that took the Fatal still has to send its reply
                return True
            time.sleep(0.02)
        return False

    def silent(self, ttl_s: float) -> list[str]:
        """Forget the clients that have not polled within ttl_s; returns their ids."""
        now = time.monotonic()
        with self._lock:
            gone = [c for c, t in self._last_poll.items() if now - t > ttl_s]
            for c in gone:
                self._queues.pop(c, None)
                self._last_poll.pop(c, None)
                self._batches.pop(c, None)
                self._poll_locks.pop(c, None)
        return gone


@dataclass(frozen=True, slots=True)
class RankHealth:
    """A rank's answer to the controller's ping. Rank 0 adds the engine's step counter and whether
    it has work: the controller reads a stall from these, never from frontends."""

    alive: bool
    steps: int = 0
    busy: bool = False


@ray.remote(max_concurrency=8)
class RankActor:
    """One rank of a replica (a Ray actor in the replica's placement group)."""

    def __init__(self, replica_id: str, rank: int):
        self.replica_id, self.rank = replica_id, rank
        self.built: Rank | None = None
        self.inbox: queue.Queue = queue.Queue()
        self.outboxes = ClientOutboxes()
        self.thread: threading.Thread | None = None

    def node(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"rank": self.rank, "pid": os.getpid(), "node_id": ctx.get_node_id(),
                "node_ip": ray.util.get_node_ip_address()}

    def rendezvous(self) -> str:
        """Rank 0: an address on its node where the others can join its process group."""
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        return f"tcp://{ip}:{port}"

    def start(self, spec: WorkerSpec, engine_config: EngineConfig) -> dict:
        """Join the group and load this rank's shard (all ranks call this concurrently)."""
        built: Future = Future()
        self.thread = threading.Thread(target=self._run, args=(spec, engine_config, built.set_result),
                                       name=f"tpserve-rank{self.rank}", daemon=True)
        self.thread.start()
        result = built.result()
        if isinstance(result, BaseException):
            raise result
        self.built = result
        if self.rank == 0 and result.loop is not None:
            threading.Thread(target=self._detach_silent_clients, name="tpserve-client-ttl", daemon=True).start()
        return {**result.worker.load_report(), **self.node()}

    def _detach_silent_clients(self) -> None:
        """Rank 0, each second: a client (frontend) that has not polled for CLIENT_TTL_S is gone, so
        its requests are aborted and its outbox dropped (it must not leave them running or growing)."""
        while self.thread is not None and self.thread.is_alive():
            for client_id in self.outboxes.silent(CLIENT_TTL_S):
                log.info("client %s of %s went silent; aborting its requests", client_id, self.replica_id)
                self.inbox.put(Detach(client_id))
            time.sleep(1.0)

    def _run(self, spec, engine_config, on_ready) -> None:
        try:
            run_rank(spec, engine_config, self.rank, self.inbox, self.outboxes, on_ready)
        except Exception:
            log.exception("rank %d of %s stopped", self.rank, self.replica_id)
            if self.rank == 0:
                self.outboxes.wait_taken(FATAL_DELIVERY_S)
            os._exit(1)  # a broken rank takes its actor down, so the controller sees it and heals

    def put(self, msg: InboxMessage) -> None:
        self.inbox.put(msg)

    def poll(self, client_id: str, timeout: float = 0.5, taken: int = -1) -> tuple[int, list[OutboxMessage]]:
        """Every output message for this client ready now, waiting up to timeout for the first
        (`ClientOutboxes.poll`: a batch whose reply was lost comes again)."""
        return self.outboxes.poll(client_id, timeout, taken)

    def health(self) -> RankHealth:
        """The controller's ping (each second): alive, and on rank 0 the engine's progress."""
        alive = self.thread is not None and self.thread.is_alive()
        loop = self.built.loop if self.built is not None else None
        if loop is None:
            return RankHealth(alive)
        p = loop.progress()
        return RankHealth(alive, p.steps, p.busy)

    def stop(self) -> None:
        if self.rank == 0 and self.thread is not None:
            self.inbox.put(Shutdown())
            self.thread.join(10)


class ActorInbox:
    """Queue-like `put` onto rank 0's actor (for EngineClient)."""

    def __init__(self, actor):
        self.actor = actor

    def put(self, msg: InboxMessage) -> None:
        self.actor.put.remote(msg)


class ActorOutbox:
    """Queue-like `get` of one client's messages from rank 0's actor, buffering a poll's batch.

    Ray documents `ActorUnavailableError` as temporary (the actor may be reachable again), and a
    get that times out says nothing about the actor: both are retried, with backoff, for up to
    `retry_s`, and the retried poll returns the batch whose reply was lost. Only an actor that
    died (or stays unreachable past the bound) ends the channel."""

    def __init__(self, actor, client_id: str, retry_s: float = TRANSIENT_RETRY_S, get_timeout_s: float = 30.0):
        self.actor, self.client_id = actor, client_id
        self.retry_s, self.get_timeout_s = retry_s, get_timeout_s
        self.buffer: list[OutboxMessage] = []
        self.taken = 0  # the last batch number received
        self.retries = 0  # transient errors retried, since start

    def get(self, timeout: float = 0.5):
        if not self.buffer:
            self._fetch(timeout)
            if not self.buffer:
                raise queue.Empty
        return self.buffer.pop(0)

    def _fetch(self, timeout: float) -> None:
        give_up, backoff = time.monotonic() + self.retry_s, 0.05
        while True:
            try:
                number, batch = ray.get(self.actor.poll.remote(self.client_id, timeout, self.taken),
                                        timeout=timeout + self.get_timeout_s)
                break
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError) as e:
                if time.monotonic() >= give_up:
                    raise EOFError(f"{e} (still failing after {self.retry_s:.0f} s of retries)") from e
                self.retries += 1
                log.warning("rank 0 poll of client %s failed (%s); retrying", self.client_id, type(e).__name__)
                time.sleep(backoff)
                backoff = min(1.0, backoff * 2)
            except ray.exceptions.RayActorError as e:  # died: the controller replaces it
                raise EOFError(str(e)) from e
        if number != self.taken:
            self.taken, self.buffer = number, list(batch)


def engine_client(rank0) -> EngineClient:
    """A client of a replica's engine through its rank-0 actor, with a client id of its own."""
    client_id = uuid.uuid4().hex[:12]
    return EngineClient(ActorInbox(rank0), ActorOutbox(rank0, client_id), is_alive=lambda: True, client_id=client_id)


@dataclass(slots=True)
class Replica:
    """A replica as the controller holds it."""

    replica_id: str
    tp_size: int
    placement: PlacementGroup
    actors: list
    state: str = "starting"  # starting | ready | unhealthy | stopping
    target_node: str | None = None  # the node its placement group was steered to
    workers: list[dict] = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)
    last_steps: int = -1
    last_progress: float = field(default_factory=time.monotonic)  # reset when it turns ready

    def observe(self, health: RankHealth) -> None:
        """Rank 0's health: progress is a step taken, or nothing to do."""
        if health.steps != self.last_steps or not health.busy:
            self.last_steps, self.last_progress = health.steps, time.monotonic()

    def stalled(self, timeout_s: float) -> bool:
        return time.monotonic() - self.last_progress > timeout_s

    def describe(self) -> dict:
        return {"replica_id": self.replica_id, "state": self.state, "tp_size": self.tp_size,
                "workers": self.workers, "rank0": self.actors[0] if self.actors else None}


def place_replica(replica_id: str, spec: WorkerSpec, engine_config: EngineConfig, resources_per_rank: dict,
                  target_node: str | None, threads: int) -> Replica:
    """Reserve tp bundles packed on one node (the hint picks which), then start one actor per rank."""
    bundles = [dict(resources_per_rank) for _ in range(spec.tp_size)]
    pg = placement_group(bundles, strategy="STRICT_PACK", name=f"tpserve-{replica_id}",
                         _soft_target_node_id=target_node)
    env = {**OPENMP_ENV, "OMP_NUM_THREADS": str(threads)}
    actors = [RankActor.options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
        num_cpus=resources_per_rank.get("CPU", 0), num_gpus=resources_per_rank.get("GPU", 0),
        runtime_env={"env_vars": env}, name=f"tpserve-{replica_id}-rank{r}", lifetime=None,
    ).remote(replica_id, r) for r in range(spec.tp_size)]
    return Replica(replica_id, spec.tp_size, pg, actors, target_node=target_node)


def start_replica(rep: Replica, spec: WorkerSpec, engine_config: EngineConfig, threads: int,
                  timeout_s: float = 600) -> None:
    """Rendezvous at rank 0, load all shards in parallel, mark ready."""
    init = ray.get(rep.actors[0].rendezvous.remote(), timeout=timeout_s) if spec.tp_size > 1 else None
    spec = replace(spec, dist_init_method=init, num_threads=threads)
    rep.workers = ray.get([a.start.remote(spec, engine_config) for a in rep.actors], timeout=timeout_s)
    rep.last_progress = time.monotonic()  # the stall clock starts now, not when loading began
    rep.state = "ready"


def stop_replica(rep: Replica, graceful: bool = True) -> None:
    """Stop the engine and leave the process group (graceful), then kill every rank's actor and
    free the placement group. Killing works on a stopped (SIGSTOP) process too."""
    rep.state = "stopping"
    if graceful:
        try:
            ray.get(rep.actors[0].stop.remote(), timeout=15)
        except Exception:  # already dead or hung: killing below is enough
            pass
    for a in rep.actors:
        ray.kill(a, no_restart=True)
    remove_placement_group(rep.placement)

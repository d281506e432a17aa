"""The controller: a named Ray actor that owns one model's replica set.

It places replicas (each a STRICT_PACK placement group of tp bundles on one node, replicas spread
over nodes), watches them (a dead or hung rank, or no step progress while there is work, makes a
replica unhealthy), replaces unhealthy ones in a fresh placement group, and scales to a new count
at run time. Frontends find it by name: several may share one controller. Progress is read from
the replicas themselves (rank 0 answers each ping with its step counter and whether it has work),
so replicas outlive frontends, and a quiet or idle frontend never hides or fakes a stall.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import ray

from cluster.replica import RankHealth, Replica, place_replica, start_replica, stop_replica
from workers.engine.core import EngineConfig
from workers.worker import WorkerSpec

log = logging.getLogger(__name__)

NAMESPACE = "tpserve"
HEAD_RESOURCE = "node:__internal_head__"  # a resource only the head node has


def controller_name(model_name: str) -> str:
    return f"controller:{model_name}"


@dataclass(slots=True)
class ClusterConfig:
    """What the controller keeps running."""

    model_name: str
    spec: WorkerSpec
    engine: EngineConfig
    replicas: int = 1
    health_period_s: float = 1.0
    alive_timeout_s: float = 3.0  # a rank that does not answer a ping this fast is hung (or stopped)
    stall_timeout_s: float = 30.0  # no step progress for this long while there is work: unhealthy


@ray.remote(num_cpus=0, max_concurrency=16)
class Controller:
    def __init__(self, config: ClusterConfig):
        self.config = config
        self.replicas: dict[str, Replica] = {}
        self.lock = threading.RLock()
        self.stopping = False
        self.restarts = 0
        self._target = config.replicas
        self._reconcile_lock = threading.Lock()
        threading.Thread(target=self._watch, name="tpserve-health", daemon=True).start()

    # ---- queries --------------------------------------------------------------------------------
    def info(self) -> dict:
        return {"model_name": self.config.model_name, "spec": self.config.spec, "engine": self.config.engine,
                "target_replicas": self._target, "restarts": self.restarts}

    def list_replicas(self) -> list[dict]:
        with self.lock:
            return [r.describe() for r in sorted(self.replicas.values(), key=lambda r: r.created)]

    def wait_ready(self, n: int | None = None, timeout_s: float = 600) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                ready = sum(r.state == "ready" for r in self.replicas.values())
            if ready >= (self._target if n is None else n):
                return True
            time.sleep(0.2)
        return False

    # ---- changes --------------------------------------------------------------------------------
    def scale(self, replicas: int) -> None:
        self._target = replicas
        threading.Thread(target=self._reconcile, daemon=True).start()

    def start(self) -> None:
        threading.Thread(target=self._reconcile, daemon=True).start()

    def shutdown(self) -> None:
        self.stopping = True
        with self.lock:
            reps, self.replicas = list(self.replicas.values()), {}
        for r in reps:
            stop_replica(r)

    # ---- placement --------------------------------------------------------------------------------
    def _resources_per_rank(self) -> dict:
        if self.config.spec.device == "cuda":
            return {"GPU": 1, "CPU": 1}
        return {"CPU": 1}

    def _pick_node(self) -> str | None:
        """The alive node holding the fewest of our replicas (ties: node id order)."""
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
        if not nodes:
            return None
        with self.lock:
            load = Counter(r.workers[0]["node_id"] if r.workers else r.target_node for r in self.replicas.values())
        return min(nodes, key=lambda n: (load[n], n))

    def _threads(self) -> int:
        cores = int(ray.cluster_resources().get("CPU", 1)) // max(1, len(ray.nodes()))
        ranks_here = self.config.spec.tp_size * max(1, -(-self._target // max(1, len(ray.nodes()))))
        return max(1, cores // ranks_here) if self.config.spec.device == "cpu" else 1

    def _add_replica(self) -> bool:
        rid = uuid.uuid4().hex[:8]
        with self.lock:  # pick and record together, so replicas starting at once spread over nodes
            node = self._pick_node()
            rep = place_replica(rid, self.config.spec, self.config.engine, self._resources_per_rank(), node,
                                self._threads())
            self.replicas[rid] = rep
        try:
            start_replica(rep, self.config.spec, self.config.engine, self._threads())
            log.info("replica %s ready on %s", rid, rep.workers[0]["node_id"])
            return True
        except Exception:
            log.exception("replica %s failed to start", rid)
            with self.lock:
                self.replicas.pop(rid, None)
            stop_replica(rep)
            return False

    def _reconcile(self) -> None:
        if not self._reconcile_lock.acquire(blocking=False):
            return  # one reconciler at a time; the running one re-reads the target each round
        try:
            failures = 0
            while not self.stopping and failures < 3:
                with self.lock:
                    live = [r for r in self.replicas.values() if r.state in ("starting", "ready")]
                if len(live) < self._target:
                    # Missing replicas start together: a replacement must not wait behind a slow load.
                    results: list[bool] = []
                    starters = [threading.Thread(target=lambda: results.append(self._add_replica()), daemon=True)
                                for _ in range(self._target - len(live))]
                    for t in starters:
                        t.start()
                    for t in starters:
                        t.join()
                    failures += results.count(False)
                elif len(live) > self._target:
                    victim = sorted(live, key=lambda r: r.created)[-1]
                    with self.lock:
                        self.replicas.pop(victim.replica_id, None)
                    stop_replica(victim)
                else:
                    return
        finally:
            self._reconcile_lock.release()

    # ---- health ------------------------------------------------------------------------------------
    def _healthy(self, rep: Replica) -> bool:
        """Every rank answers the ping in time and is alive, and rank 0 made progress lately."""
        try:
            answers: list[RankHealth] = ray.get([a.health.remote() for a in rep.actors],
                                                timeout=self.config.alive_timeout_s)
        except Exception:  # an actor died, or did not answer in time (hung or stopped)
            return False
        if not all(h.alive for h in answers):
            return False
        rep.observe(answers[0])
        if rep.stalled(self.config.stall_timeout_s):
            log.warning("replica %s took no step for %.0f s while it had work", rep.replica_id,
                        self.config.stall_timeout_s)
            return False
        return True

    def _watch(self) -> None:
        while not self.stopping:
            time.sleep(self.config.health_period_s)
            with self.lock:
                ready = [r for r in self.replicas.values() if r.state == "ready"]
            bad = [rep for rep in ready if not self._healthy(rep)]
            for rep in bad:
                log.warning("replica %s unhealthy; replacing it", rep.replica_id)
                rep.state = "unhealthy"
                with self.lock:
                    self.replicas.pop(rep.replica_id, None)
                    self.restarts += 1
                stop_replica(rep, graceful=False)  # a hung rank would only stall a graceful stop
            if bad or not self.stopping:
                with self.lock:
                    short = sum(r.state in ("starting", "ready") for r in self.replicas.values()) < self._target
                if short:
                    threading.Thread(target=self._reconcile, daemon=True).start()


def get_or_create_controller(config: ClusterConfig, detached: bool):
    """The model's controller: the existing one if a frontend already started it, else a new one."""
    name = controller_name(config.model_name)
    try:
        return ray.get_actor(name, namespace=NAMESPACE), False
    except ValueError:
        pass
    # On the head node, as Ray Serve places its controller: a worker node may go away with its
    # replicas, and the controller must outlive it to replace them. (The head's loss ends the
    # Ray cluster anyway.)
    opts = {"name": name, "namespace": NAMESPACE, "get_if_exists": True, "resources": {HEAD_RESOURCE: 0.001}}
    if detached:
        opts["lifetime"] = "detached"
    handle = Controller.options(**opts).remote(config)
    handle.start.remote()
    return handle, True

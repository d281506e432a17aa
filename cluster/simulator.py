"""A discrete-event model of a cluster: the real engine and the real routing code, with each
engine step priced instead of run, past what one machine holds.

    python -m cluster.simulator [--replicas 64] [--tenants 10000] [--requests 20000] [--rate R]
                                [--policies kv-aware,least-load,round-robin] [--calibrate]

What is real: each replica is an `EngineCore` (workers/engine/core.py: scheduler, block manager,
prefix cache with LRU eviction, chunked prefill, preemption, finish rules) on a
`ModelledExecutor` (cluster/modelled_executor.py), which prices each step's plan with a cost model
and returns placeholder tokens. Requests that arrive during a step join the engine at the next
one, as rank 0's loop takes its inbox between steps. After each step a replica reports KVEvents
as rank 0 does; the router is `cluster.routing`'s policy, KV index and `ReplicaBook` (what it
placed but the engine has not yet counted), the frontend's own objects.

What is modelled: a step's duration, from the step's shape. `CostModel` (step_s +
prefill_token_s x prompt tokens + decode_seq_s x decoding sequences) defaults to a fit for
SmolLM2-135M on this project's 2-core machine at one thread per replica (`--calibrate` measures
it again on the real engine); the planner's `RooflineCost` (cluster/planner/cost.py) prices the
same shapes from a hardware profile. Reports reach the router at the step's end (no transport
delay).

Load: open loop (each request arrives at its `arrival`), or closed loop (`concurrency` requests in
flight; each completion sends the next request at once, as `tpserve bench --concurrency` does).

This is the one simulator of the project: the planner (`tpserve plan`) extends it.
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from cluster.kv_index import KVIndex
from cluster.modelled_executor import CostModel, ModelledExecutor, ReplicaModel, StepCost, StepShape
from cluster.routing import POLICIES, LoadBoard, ReplicaBook, RoutingConfig, RoutingPolicy, slot_mask
from workers.engine.block_keys import BlockKeyer, new_salt
from workers.engine.core import EngineConfig, EngineCore
from workers.engine.messages import EngineLoad, KVDigest, KVEvents
from workers.engine.sampling_params import SamplingParams

__all__ = ["CostModel", "ReplicaModel", "SimReplica", "SimRequest", "SimResult", "StepShape", "multi_tenant",
           "simulate"]


@dataclass(slots=True)
class SimRequest:
    arrival: float
    prompt: list[int]
    max_tokens: int
    keys: list[bytes] = field(default_factory=list)  # computed before the run: hashing is not routing
    tenant: int = -1
    replica: int = -1
    ttft: float | None = None
    done: float | None = None
    cached_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        """As docs/bench.md defines it: (E2E - TTFT) / (output tokens - 1)."""
        if self.done is None or self.ttft is None or self.max_tokens < 2:
            return None
        return (self.done - self.arrival - self.ttft) / (self.max_tokens - 1)


class SimulationError(RuntimeError):
    """The engine refused or failed a simulated request: the simulation's set-up is wrong."""


class SimReplica:
    """One replica: the real EngineCore on a ModelledExecutor. `start_step` takes the inbox and
    runs a step (its outputs held until the step's modelled end); `end_step` delivers them."""

    CLIENT = "router"  # the one client of every modelled replica

    def __init__(self, rid: str, model: ReplicaModel, salt: bytes, cost: StepCost, book: ReplicaBook | None = None):
        self.rid = rid
        self.executor = ModelledExecutor(cost, model)
        self.engine = EngineCore(self.executor, None, EngineConfig(model.max_num_seqs, model.max_num_batched_tokens,
                                                                   True, salt))
        self.book = book or ReplicaBook()
        self.inbox: list[SimRequest] = []
        self.live: dict[str, SimRequest] = {}
        self.sent = self.taken = 0  # AddRequest numbers: sent by the router, taken by the engine
        self.kv_seq = 0
        self.load = EngineLoad(num_blocks=model.num_blocks)
        self.stepping = False
        self.finished: list[SimRequest] = []  # requests the last step completed
        self._outputs = []
        self._ids = itertools.count()

    def start_step(self) -> float | None:
        """Take the inbox and run a step; its modelled duration, or None when there is nothing to do."""
        for req in self.inbox:
            rid = f"r{next(self._ids)}"
            try:
                self.engine.add_request(rid, req.prompt, SamplingParams(max_tokens=req.max_tokens, ignore_eos=True))
            except Exception as e:
                raise SimulationError(f"replica {self.rid} refused a request of {len(req.prompt)} + "
                                      f"{req.max_tokens} tokens: {e}") from e
            self.live[rid] = req
        self.taken += len(self.inbox)
        self.inbox = []
        steps = self.executor.steps
        self._outputs = self.engine.step()
        return self.executor.last_step_s if self.executor.steps != steps else None

    def end_step(self, now: float) -> KVEvents:
        """The step's outputs reach their requests at `now`; the KVEvents rank 0 would send."""
        self.finished = []
        for out in self._outputs:
            req = self.live[out.request_id]
            if out.finish_reason == "error":
                raise SimulationError(f"replica {self.rid}: {out.error}")
            if req.ttft is None and out.new_token_ids:
                req.ttft = now - req.arrival
                req.cached_tokens = out.cached_prompt_tokens
            if out.finished:
                req.done = now
                self.finished.append(req)
                del self.live[out.request_id]
                self.book.closed()
        self._outputs = []
        stored, removed = self.engine.block_manager.events.take()
        self.load = self.engine.load(((self.CLIENT, self.taken),))
        self.book.report(self.load, self.CLIENT)
        self.kv_seq += 1
        return KVEvents(self.kv_seq, stored, removed, self.load)

    def digest(self) -> KVDigest:
        return self.engine.kv_digest(self.kv_seq)


@dataclass(slots=True)
class SimResult:
    policy: str
    requests: list[SimRequest]
    decision_us: list[float]
    reasons: dict
    index_entries: int
    index_bytes: int
    sim_s: float
    wall_s: float

    def summary(self) -> dict:
        ttft = [r.ttft for r in self.requests if r.ttft is not None]
        prompt = sum(len(r.prompt) for r in self.requests)
        d = np.asarray(self.decision_us)
        done = [r for r in self.requests if r.done is not None]
        tpot = [r.tpot for r in done if r.tpot is not None]
        span = max(r.done for r in done) - min(r.arrival for r in self.requests) if done else 0.0
        return {"policy": self.policy, "completed": len(done),
                "tpot_ms_p50": float(np.percentile(tpot, 50) * 1e3) if tpot else None,
                "tpot_ms_mean": float(np.mean(tpot) * 1e3) if tpot else None,
                "output_tok_s": sum(r.max_tokens for r in done) / span if span > 0 else 0.0,
                "ttft_p50_ms": float(np.percentile(ttft, 50) * 1e3), "ttft_p90_ms": float(np.percentile(ttft, 90) * 1e3),
                "hit_rate": sum(r.cached_tokens for r in self.requests) / prompt if prompt else 0.0,
                "decision_us_p50": float(np.percentile(d, 50)), "decision_us_p99": float(np.percentile(d, 99)),
                "reasons": dict(self.reasons), "index_entries": self.index_entries,
                "index_mib": self.index_bytes / 2**20, "sim_s": self.sim_s, "wall_s": self.wall_s}


def simulate(requests: list[SimRequest], policy: str, replicas: int, model: ReplicaModel, cost,
             keyer: BlockKeyer, routing: RoutingConfig | None = None, concurrency: int | None = None) -> SimResult:
    """Route and serve `requests` on `replicas` modelled replicas under `policy`. Open loop: each
    arrives at its `arrival`. Closed loop (`concurrency`): the first `concurrency` arrive at 0 and
    each completion sends the next one at that moment (their `arrival` is overwritten)."""
    now = 0.0
    index = KVIndex(clock=lambda: now)
    base = routing or RoutingConfig()
    cfg = RoutingConfig(policy, base.prefill_weight, base.balance_rel, base.balance_abs_tokens)
    router = RoutingPolicy(cfg, index)
    board = LoadBoard()
    slots = [index.slot(f"replica-{i}") for i in range(replicas)]
    if slots != list(range(replicas)):
        raise SimulationError(f"a new KVIndex gave slots {slots[:4]}...: the board's loads would not be in replica order")
    reps = [SimReplica(f"replica-{i}", model, keyer.salt, cost, board.book(i)) for i in range(replicas)]
    among = slot_mask(slots)
    events: list = []  # (time, order, kind, payload)
    order = itertools.count()
    pending = deque(requests)
    if concurrency is None:
        for req in requests:
            heapq.heappush(events, (req.arrival, next(order), 0, req))
        pending.clear()
    else:
        for _ in range(min(concurrency, len(pending))):
            req = pending.popleft()
            req.arrival = 0.0
            heapq.heappush(events, (0.0, next(order), 0, req))
    decisions, reasons = [], {}
    wall = time.perf_counter()

    def kick(i: int) -> None:
        d = reps[i].start_step()
        if d is None:
            reps[i].stepping = False
        else:
            reps[i].stepping = True
            heapq.heappush(events, (now + d, next(order), 1, i))

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == 0:  # an arrival: the routing decision, timed
            req = payload
            t = time.perf_counter()
            # The board's list is the replicas' loads in replica order (slot i is replica i).
            dec = router.choose(slots, board.loads, req.keys, len(req.prompt), model.block_size, among)
            decisions.append((time.perf_counter() - t) * 1e6)
            if cfg.policy == "kv-aware":
                index.expect(reps[dec.index].rid, req.keys[:(len(req.prompt) - 1) // model.block_size])
            reasons[dec.reason] = reasons.get(dec.reason, 0) + 1
            i = dec.index
            req.replica = i
            r = reps[i]
            r.inbox.append(req)
            r.sent += 1
            r.book.placed(r.sent, len(req.prompt) - dec.cached_tokens + req.max_tokens)
            if not r.stepping:
                kick(i)
        else:  # a replica's step ended: apply it, report, and start the next
            i = payload
            ev = reps[i].end_step(now)
            if index.apply(reps[i].rid, ev):
                index.apply_digest(reps[i].rid, reps[i].digest())
            for _ in reps[i].finished:  # closed loop: each completion sends the next request
                if pending:
                    nxt = pending.popleft()
                    nxt.arrival = now
                    heapq.heappush(events, (now, next(order), 0, nxt))
            kick(i)
    return SimResult(cfg.policy, requests, decisions, reasons, index.size, index.memory_bytes(), now,
                     time.perf_counter() - wall)


def multi_tenant(tenants: int, requests: int, rate: float, prefix_len: int, question: tuple[int, int],
                 output: tuple[int, int], zipf_s: float, keyer: BlockKeyer, block_size: int,
                 seed: int = 0) -> list[SimRequest]:
    """Tenants drawn with Zipf popularity (rank k with weight k^-s), a system prompt each, Poisson
    arrivals. Block keys are computed here, before the run, as the frontend does with tokenizing."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, tenants + 1) ** zipf_s
    who = rng.choice(tenants, size=requests, p=weights / weights.sum())
    systems: dict[int, list[int]] = {}
    system_keys: dict[int, list[bytes]] = {}
    t = np.cumsum(rng.exponential(1 / rate, size=requests))
    out = []
    for k in range(requests):
        w = int(who[k])
        if w not in systems:
            systems[w] = rng.integers(100, 40000, size=prefix_len).tolist()
            system_keys[w] = keyer.keys(systems[w], block_size)
        q = rng.integers(100, 40000, size=int(rng.integers(question[0], question[1] + 1))).tolist()
        prompt = systems[w] + q
        # The system prompt's keys are shared; only the blocks past it are hashed again.
        keys = system_keys[w] + keyer.keys(prompt, block_size)[len(system_keys[w]):] \
            if prefix_len % block_size == 0 else keyer.keys(prompt, block_size)
        out.append(SimRequest(float(t[k]), prompt, int(rng.integers(output[0], output[1] + 1)), keys, w))
    return out


def calibrate() -> CostModel:
    """Fit the cost model on the real engine: SmolLM2-135M, one thread, prefill and decode steps."""
    from workers import set_openmp_env  # noqa: E402
    set_openmp_env()
    from workers.launcher import start_worker_group
    from workers.model_source import resolve_model
    from workers.worker import WorkerSpec

    rng = np.random.default_rng(0)
    with start_worker_group(WorkerSpec(str(resolve_model("smollm2-135m")), tp_size=1, num_threads=1)) as g:
        def timed(prompts, max_tokens):
            t = time.perf_counter()
            g.engine.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
            return time.perf_counter() - t

        timed([rng.integers(100, 40000, size=16).tolist()], 2)
        p64 = min(timed([rng.integers(100, 40000, size=64).tolist()], 1) for _ in range(2))
        p512 = min(timed([rng.integers(100, 40000, size=512).tolist()], 1) for _ in range(2))
        per_token = (p512 - p64) / 448
        d1 = (timed([rng.integers(100, 40000, size=16).tolist()], 33) - timed(
            [rng.integers(100, 40000, size=16).tolist()], 1)) / 32
        batch = [rng.integers(100, 40000, size=16).tolist() for _ in range(32)]
        d32 = (timed(batch, 17) - timed(batch, 1)) / 16
    per_seq = max(0.0, (d32 - d1) / 31)
    return CostModel(step_s=max(0.0, d1 - per_seq), prefill_token_s=per_token, decode_seq_s=per_seq)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=64)
    ap.add_argument("--tenants", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=None, help="requests/s (default: 0.9 per replica)")
    ap.add_argument("--prefix-len", type=int, default=1000)
    ap.add_argument("--question", default="16,64")
    ap.add_argument("--output", default="8,32")
    ap.add_argument("--zipf", type=float, default=1.1, help="tenant popularity exponent")
    ap.add_argument("--num-blocks", type=int, default=4096, help="KV blocks per replica")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--calibrate", action="store_true", help="measure the cost model on the real engine first")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cost = calibrate() if args.calibrate else CostModel()
    print(f"cost model: step {cost.step_s * 1e3:.1f} ms + {cost.prefill_token_s * 1e3:.2f} ms/prompt token + "
          f"{cost.decode_seq_s * 1e3:.2f} ms/decoding sequence", flush=True)
    model = ReplicaModel(num_blocks=args.num_blocks)
    keyer = BlockKeyer(new_salt())
    q, o = (tuple(int(x) for x in v.split(",")) for v in (args.question, args.output))
    rate = args.rate or 0.9 * args.replicas
    t = time.perf_counter()
    base = multi_tenant(args.tenants, args.requests, rate, args.prefix_len, q, o, args.zipf, keyer, model.block_size,
                        args.seed)
    print(f"{args.requests} requests from {args.tenants} tenants (Zipf {args.zipf}) at {rate:g}/s on "
          f"{args.replicas} replicas x {args.num_blocks} blocks; keys computed in {time.perf_counter() - t:.1f} s",
          flush=True)
    rows = []
    for policy in args.policies.split(","):
        reqs = [SimRequest(r.arrival, r.prompt, r.max_tokens, r.keys, r.tenant) for r in base]
        s = simulate(reqs, policy, args.replicas, model, cost, keyer).summary()
        rows.append(s)
        print(f"  {policy:<12} TTFT p50 {s['ttft_p50_ms']:8.0f} ms  p90 {s['ttft_p90_ms']:8.0f} ms  "
              f"hit {s['hit_rate']:.3f}  decision p50 {s['decision_us_p50']:.0f} us  p99 {s['decision_us_p99']:.0f} us  "
              f"index {s['index_entries']} entries, {s['index_mib']:.1f} MiB  reasons {s['reasons']}  "
              f"({s['sim_s']:.0f} s simulated in {s['wall_s']:.1f} s: {s['completed'] / s['wall_s']:.0f} requests/s)",
              flush=True)
    print("\n| policy | TTFT p50 ms | TTFT p90 ms | hit rate | decision p50 us | decision p99 us | index entries | index MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in rows:
        print(f"| {s['policy']} | {s['ttft_p50_ms']:.0f} | {s['ttft_p90_ms']:.0f} | {s['hit_rate']:.3f} | "
              f"{s['decision_us_p50']:.0f} | {s['decision_us_p99']:.0f} | {s['index_entries']} | {s['index_mib']:.1f} |")
    if len(rows) > 1 and rows[0]["policy"] == "kv-aware":
        for s in rows[1:]:
            print(f"kv-aware / {s['policy']}: TTFT p90 {rows[0]['ttft_p90_ms'] / s['ttft_p90_ms']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

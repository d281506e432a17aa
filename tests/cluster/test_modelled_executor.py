"""The simulator is the engine: an EngineCore on a ModelledExecutor schedules exactly the steps the
same EngineCore schedules on a real worker (chunked prefill, prefix hits, preemption, finishes),
and the simulator's replicas are those EngineCores."""
from __future__ import annotations

import pytest

from cluster.modelled_executor import CostModel, ModelledExecutor, ReplicaModel, StepShape
from cluster.simulator import SimReplica, SimRequest, simulate
from workers.engine.block_keys import BlockKeyer, new_salt
from workers.engine.core import EngineConfig, EngineCore
from workers.engine.executor import WorkerExecutor
from workers.engine.sampling_params import SamplingParams
from workers.worker import Worker, WorkerSpec


class Recording:
    """An executor that records each step's shape and passes the step on."""

    def __init__(self, inner):
        self.inner, self.shapes = inner, []
        for name in ("vocab_size", "max_model_len", "num_blocks", "block_size", "eos_token_ids", "heartbeat_s"):
            setattr(self, name, getattr(inner, name))

    def execute(self, plan, sampling):
        self.shapes.append(StepShape.of(plan))
        return self.inner.execute(plan, sampling)


def drive(executor, requests, config):
    """Requests (prompt, max_tokens, step at which it arrives) through one EngineCore; the finish
    of each request and the engine's counters."""
    core = EngineCore(executor, None, config)
    finished, step = {}, 0
    while step < 10_000:
        for i, (prompt, max_tokens, at) in enumerate(requests):
            if at == step:
                core.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        if not core.has_work() and all(at < step for *_, at in requests):
            break
        for out in core.step():
            if out.finished:
                finished[out.request_id] = (out.finish_reason, out.output_tokens, out.cached_prompt_tokens)
        step += 1
    st = core.snapshot()
    return finished, (st.steps, st.preemptions, st.prefix_hit_tokens, st.prompt_tokens_computed)


def test_the_modelled_executor_schedules_the_steps_a_real_worker_runs(tiny_llama_dir):
    worker = Worker(WorkerSpec(str(tiny_llama_dir), kv_cache_memory=100 << 10), 0)  # ~16 blocks
    real = Recording(WorkerExecutor(worker))
    # A small cache and budget: long prompts prefill in chunks, a shared prefix hits the cache, and
    # the last arrivals preempt the youngest running sequence.
    shared = list(range(3, 67))
    requests = [(shared + [70 + i] * (5 + i), 12 + i, i // 3) for i in range(9)]
    requests += [(list(range(100, 100 + 90)), 20, 4), (shared + [200], 6, 7)]
    config = EngineConfig(max_num_seqs=6, max_num_batched_tokens=48, block_key_salt=b"s" * 16)
    # The real worker's cache size, so that both engines hold the same blocks.
    model = ReplicaModel(num_blocks=real.num_blocks, block_size=real.block_size, max_num_seqs=6,
                         max_num_batched_tokens=48, max_model_len=real.max_model_len, vocab_size=real.vocab_size)
    modelled = Recording(ModelledExecutor(CostModel(), model))
    assert real.num_blocks < 60  # small enough to preempt
    got_real, stats_real = drive(real, requests, config)
    got_model, stats_model = drive(modelled, requests, config)
    assert len(got_real) == len(requests)
    assert modelled.shapes == real.shapes
    assert got_model == got_real
    assert stats_model == stats_real
    steps, preemptions, hits, _ = stats_real
    assert preemptions > 0 and hits > 0 and any(len(s.prefill) and len(s.decode) for s in real.shapes)
    worker.close()


def test_simulated_replicas_are_engine_cores_and_obey_its_finish_rules():
    """A replica's engine refuses what the real engine refuses (the context), and counts what it counts."""
    model = ReplicaModel(num_blocks=64, max_model_len=128)
    rep = SimReplica("r", model, new_salt(), CostModel())
    assert isinstance(rep.engine, EngineCore)
    rep.inbox.append(SimRequest(0.0, list(range(100, 200)), 40))  # 100 + 40 > 128
    with pytest.raises(Exception, match="max_tokens"):
        rep.start_step()
    res = simulate([SimRequest(0.0, list(range(100, 164)), 8) for _ in range(3)], "least-load", 1, model,
                   CostModel(step_s=0.01, prefill_token_s=0.0, decode_seq_s=0.0), BlockKeyer(new_salt()))
    assert all(r.done is not None for r in res.requests)
    # The second and third share the first's prompt: the engine's prefix cache served them.
    assert sorted(r.cached_tokens for r in res.requests) == [0, 48, 48]

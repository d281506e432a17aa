"""What an engine step runs on.

EngineCore schedules a step, builds its plan, hands the plan to an executor and commits what comes
back (one token, or one request's error, per sampling sequence). The executor is the only part of
a step that touches a model:

- `WorkerExecutor`: rank 0's Worker, which drives the other ranks of its group (forward, then
  sampling on rank 0's gathered logits);
- `cluster.modelled_executor.ModelledExecutor`: the same interface priced by a cost model instead
  of run, so that the simulator and `tpserve plan` drive the real engine (scheduler, block
  manager, prefix cache, preemption, finish rules) without weights.
"""
from __future__ import annotations

from typing import Protocol

from workers.engine.sampler import SampleError, SampleResult, score_and_sample
from workers.engine.sequence import Sequence
from workers.step_plan import StepPlan
from workers.trace import region


class Executor(Protocol):
    """The shape of the replica the engine schedules for, and the step itself."""

    vocab_size: int
    max_model_len: int
    num_blocks: int
    block_size: int
    eos_token_ids: list[int]
    heartbeat_s: float  # an idle engine calls `idle` at least this often

    def execute(self, plan: StepPlan, sampling: list[Sequence]) -> list[SampleResult | SampleError]:
        """Run one step; one result per sequence in `sampling` (the plan's logits rows, in order)."""

    def idle(self) -> None:
        """Nothing to run: keep whatever waits on rank 0 alive."""

    def shutdown(self) -> None:
        """The engine stops: release whatever follows rank 0."""


class WorkerExecutor:
    """Rank 0's Worker and, through its broadcasts, the rest of the tensor-parallel group."""

    def __init__(self, worker):
        self.worker = worker
        self.vocab_size = worker.config.vocab_size
        self.max_model_len = worker.max_model_len
        self.num_blocks = worker.num_blocks
        self.block_size = worker.block_size
        self.eos_token_ids = list(worker.eos_token_ids)
        # Followers wait in a collective; a heartbeat well inside its timeout keeps them there.
        self.heartbeat_s = min(5.0, worker.spec.collective_timeout_s / 4)

    def execute(self, plan: StepPlan, sampling: list[Sequence]) -> list[SampleResult | SampleError]:
        logits = self.worker.step(plan) if plan.input_ids else None
        if not sampling:
            return []
        with region("tpserve.sample"):
            return score_and_sample(logits, sampling)

    def idle(self) -> None:
        self.worker.heartbeat(self.heartbeat_s)

    def shutdown(self) -> None:
        self.worker.stop_followers()

"""The worker group priced instead of run: an executor (workers/engine/executor.py) for the real
EngineCore that returns placeholder tokens and the step's modelled duration.

The simulator and `tpserve plan` build real EngineCores on it, so the scheduler, block manager,
prefix cache, preemption and finish rules they model are the engine's own code. A cost model
prices each step from its shape (`StepShape`, read off the engine's `StepPlan` as the worker's
attention reads it: a one-token chunk is a decode against its cached context, anything longer
a prefill chunk); `CostModel` is a linear fit for the routing simulations, the planner's
`RooflineCost` (cluster/planner/cost.py) prices the same shapes from a hardware profile.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from workers.defaults import BLOCK_SIZE, MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS
from workers.engine.sampler import SampleResult
from workers.engine.sequence import Sequence
from workers.step_plan import StepPlan


@dataclass(frozen=True, slots=True)
class StepShape:
    """What one engine step computes: (new tokens, tokens already cached) per prefill chunk, and
    the context length (cached tokens + the new one) of each decoding sequence."""

    prefill: tuple[tuple[int, int], ...] = ()
    decode: tuple[int, ...] = ()

    @classmethod
    def of(cls, plan: StepPlan) -> "StepShape":
        prefill, decode = [], []
        for s in plan.seqs:
            if s.length == 1:
                decode.append(s.start + 1)
            else:
                prefill.append((s.length, s.start))
        return cls(tuple(prefill), tuple(decode))

    @property
    def prefill_tokens(self) -> int:
        return sum(n for n, _ in self.prefill)

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + len(self.decode)


class StepCost(Protocol):
    def step_time(self, shape: StepShape) -> float:
        """Seconds for one engine step of this shape."""


@dataclass(frozen=True, slots=True)
class CostModel:
    """Seconds per engine step, from what the step holds (a linear fit: `cluster.simulator
    --calibrate` measures it on the real engine)."""

    step_s: float = 0.060
    prefill_token_s: float = 0.0030
    decode_seq_s: float = 0.0030

    def step_time(self, shape: StepShape) -> float:
        return self.step_s + self.prefill_token_s * shape.prefill_tokens + self.decode_seq_s * len(shape.decode)


@dataclass(frozen=True, slots=True)
class ReplicaModel:
    """The shape of a modelled replica: what the engine reads from its worker group."""

    num_blocks: int = 4096
    block_size: int = BLOCK_SIZE
    max_num_seqs: int = MAX_NUM_SEQS
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS
    max_model_len: int = 8192
    vocab_size: int = 49152


class ModelledExecutor:
    """`execute` prices the plan and returns one placeholder token per sampling row; `last_step_s`
    is that step's modelled duration (the simulator's clock advances by it)."""

    # Requests the simulator sends set ignore_eos; a token outside every eos list keeps
    # the finish rules of those that do not the same: length, or max_model_len.
    PLACEHOLDER_TOKEN = 7

    def __init__(self, cost: StepCost, model: ReplicaModel):
        self.cost = cost
        self.vocab_size = model.vocab_size
        self.max_model_len = model.max_model_len
        self.num_blocks = model.num_blocks
        self.block_size = model.block_size
        self.eos_token_ids: list[int] = []
        self.heartbeat_s = 5.0
        self.last_step_s = 0.0
        self.steps = 0

    def execute(self, plan: StepPlan, sampling: list[Sequence]) -> list[SampleResult]:
        self.last_step_s = self.cost.step_time(StepShape.of(plan))
        self.steps += 1
        token = SampleResult(self.PLACEHOLDER_TOKEN)
        return [token] * len(sampling)

    def idle(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

"""What a decode step costs on the running engine, by the rows it computes: the price the
speculation rule weighs proposals against (workers/engine/speculative.py).

Measured, not modelled: a verify step of K+1 rows per sequence costs 1.1x a one-row step with the
int kernels fed bf16 and 2.4x in fp32 on the same 2-core machine (docs/benchmarks.md), and which
holds is a property of the machine, the dtype and the batch. The engine times each step that
decodes only (no prefill chunk) and keeps the last few times per row count; an estimate is their
median, linear between the row counts measured, and unknown past them. Samples expire after
`expire_steps` engine steps, so a row count that stopped being chosen is measured again now and
then, and a slow moment under one sample does not rule speculation out for good.
"""
from __future__ import annotations

import statistics
from collections import deque

WINDOW = 8  # times kept per row count: a median over 8 rides out one step in a slow moment
EXPIRE_STEPS = 512


class StepCosts:
    """Seconds per decode-only step by its query rows, and the proposer's seconds per proposed token."""

    def __init__(self, window: int = WINDOW, expire_steps: int = EXPIRE_STEPS):
        self.window, self.expire_steps = window, expire_steps
        self._steps: dict[int, deque[tuple[int, float]]] = {}
        self._propose: deque[tuple[int, float]] = deque(maxlen=window)

    def record(self, rows: int, seconds: float, step_no: int) -> None:
        self._steps.setdefault(rows, deque(maxlen=self.window)).append((step_no, seconds))

    def record_proposal(self, tokens: int, seconds: float, step_no: int) -> None:
        """The proposer's time for `tokens` proposed tokens (an n-gram lookup: microseconds; a
        draft model: its forwards)."""
        if tokens > 0:
            self._propose.append((step_no, seconds / tokens))

    def table(self, step_no: int) -> "CostTable":
        """The estimates as of engine step `step_no` (samples older than expire_steps dropped)."""
        fresh = {}
        for rows, samples in self._steps.items():
            times = [s for n, s in samples if step_no - n <= self.expire_steps]
            if times:
                fresh[rows] = statistics.median(times)
        per_token = [s for n, s in self._propose if step_no - n <= self.expire_steps]
        return CostTable(fresh, statistics.median(per_token) if per_token else 0.0)


class CostTable:
    """One step's view of StepCosts: `step(rows)` in seconds or None where not measured."""

    __slots__ = ("_at", "_rows", "propose_per_token")

    def __init__(self, at: dict[int, float], propose_per_token: float):
        self._at, self._rows = at, sorted(at)
        self.propose_per_token = propose_per_token

    def step(self, rows: int) -> float | None:
        at = self._at.get(rows)
        if at is not None:
            return at
        lower = [r for r in self._rows if r < rows]
        upper = [r for r in self._rows if r > rows]
        if not lower or not upper:
            return None
        lo, hi = lower[-1], upper[0]
        return self._at[lo] + (self._at[hi] - self._at[lo]) * (rows - lo) / (hi - lo)

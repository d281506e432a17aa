"""Seeded arrival schedules. Open loop: Poisson (exponential gaps) at `rate`, or gamma gaps with
shape `burstiness` and the same mean (burstiness 1 is Poisson; below 1 burstier, above 1 smoother),
as in vLLM's serving benchmark."""
from __future__ import annotations

import numpy as np


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Send times (seconds from the start) of n requests."""
    if rate <= 0 or not np.isfinite(rate):
        raise ValueError(f"--request-rate must be a positive number, got {rate}")
    if burstiness <= 0:
        raise ValueError(f"--burstiness must be > 0, got {burstiness}")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    return np.cumsum(gaps) - gaps[0]  # the first request goes at t = 0

"""One tensor-parallel replica's inside: parallel layers, models, weight loading, workers.

This package never imports Ray or gRPC, so a worker group runs under the local launcher,
under Ray actors, or inside a test.
"""
import os

# OpenMP helper threads of a rank. PASSIVE: an idle helper sleeps rather than spins, which matters
# when ranks and other processes share cores (small ops went from ~50 us to ~8 ms with spinning
# helpers). But a helper put to sleep after every parallel region is woken dozens of times per
# layer: at tp 1 on 2 threads a SmolLM2 decode step took 52 ms instead of 33. GOMP_SPINCOUNT
# (which libgomp lets override the policy) keeps a helper spinning 10,000 pauses (well under a
# millisecond) before it sleeps: it bridges the gaps between a step's ops, not between steps.
OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}


def set_openmp_env() -> None:
    """Before torch loads (libgomp reads these once); values already set are kept. Importing
    anything from `workers` does it, and every rank is a process started after it (the local
    launcher's spawned processes, Ray actors with these in their runtime env), so the ranks run
    with these settings even when the caller imported torch first."""
    for key, value in OPENMP_ENV.items():
        os.environ.setdefault(key, value)
    # Inductor's compiled kernels (workers/compiled_step.py) beside tpserve's other caches, so a
    # second start finds them; inductor fixes its folder when it first loads, hence here.
    from workers.model_source import cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))


set_openmp_env()

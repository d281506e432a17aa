"""One rank's life, whoever hosts it (a local process, a thread at tp 1, a Ray actor): build the
Worker (join the group, load this rank's shard) and on rank 0 the engine, say so, then serve
until stopped. Written once, so a fault fix reaches every host.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workers.config import ModelConfig
from workers.engine.core import EngineConfig, EngineCore
from workers.engine.draft import build_draft_proposer
from workers.engine.executor import WorkerExecutor
from workers.engine.loop import EngineLoop, worker_calls
from workers.worker import Worker, WorkerSpec


def load_detokenizer(model_path: str):
    """The fast tokenizer from tokenizer.json, if the checkpoint has one (tiny test models do not)."""
    path = Path(model_path) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


@dataclass(slots=True)
class Rank:
    """A built rank: its Worker, and on rank 0 the engine loop that drives the others."""

    worker: Worker
    loop: EngineLoop | None


def run_rank(spec: WorkerSpec, engine_config: EngineConfig, rank: int, inbox, outbox,
             on_ready: Callable[[Rank | BaseException], None]) -> None:
    """Build rank `rank`, hand `on_ready` the Rank (or the error that stopped the build, which is
    then not raised again), and serve: rank 0 runs the engine loop on inbox/outbox, the others
    follow rank 0's plans. Returns at shutdown; an error while serving propagates to the host."""
    try:
        # Rank 0 loads a draft model before its share of the target: the other ranks then wait for
        # it inside the load's collectives (load_timeout_s), never in the first plan's
        # (collective_timeout_s, seconds).
        sc = engine_config.speculative
        proposer = None
        if rank == 0 and sc is not None and sc.method == "draft_model":
            proposer = build_draft_proposer(sc, spec, ModelConfig.from_pretrained(spec.model_path).vocab_size)
        worker = Worker(spec, rank)
        loop = None
        if rank == 0:
            engine = EngineCore(WorkerExecutor(worker), load_detokenizer(spec.model_path), engine_config, proposer)
            loop = EngineLoop(engine, inbox, outbox, worker_calls(worker))
    except BaseException as e:  # the host reports it (a WorkerError for the caller)
        on_ready(e)
        return
    on_ready(Rank(worker, loop))
    try:
        if loop is not None:
            loop.run()
        else:
            worker.follow()
    finally:
        worker.close()

"""The loop rank 0 runs: take requests between steps, step while there is work, and ship each
step's deltas as one message per client. Channels are queue-like (queue.Queue in-process,
multiprocessing queues across processes, an actor's mailboxes under Ray), so the loop does not
know its host. The messages are the dataclasses of `workers.engine.messages`.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from workers.engine.core import EngineCore
from workers.engine.messages import (AbortRequest, AddRequest, Call, CallResult, Detach, Fatal, KVDigest,
                                     KVEvents, Shutdown, StepOutputs)
from workers.engine.outputs import RequestOutput
from workers.errors import TpserveError, WorkerError

log = logging.getLogger(__name__)

# How long an abort that found no live request waits for its add (an add that it overtook).
EARLY_ABORT_TTL_S = 10.0


def worker_calls(worker) -> dict[str, Callable]:
    """The calls a client may make on rank 0's Worker through the loop, bound here by name once."""
    return {"prefill_logits": worker.prefill_logits, "load_report": worker.load_report,
            "set_comm_timing": worker.set_comm_timing, "info": worker.info,
            "layer_stack_steps": worker.layer_stack_steps}


def group_lost(e: BaseException) -> bool:
    """Whether an error is the worker group's (a rank gone, a collective timed out) rather than
    something a request's data could have caused."""
    import torch.distributed

    return isinstance(e, (WorkerError, torch.distributed.DistError))


def drain(q, timeout: float | None) -> list:
    """Everything in q now, waiting up to timeout for the first item (None: do not wait)."""
    items = []
    try:
        items.append(q.get(timeout=timeout) if timeout is not None else q.get_nowait())
        while True:
            items.append(q.get_nowait())
    except queue.Empty:
        pass
    return items


@dataclass(frozen=True, slots=True)
class Progress:
    """What a health check reads from the loop: a step counter that must move while there is work."""

    steps: int
    busy: bool


class EngineLoop:
    def __init__(self, engine: EngineCore, inbox, outbox, calls: dict[str, Callable] | None = None):
        self.engine, self.inbox, self.outbox = engine, inbox, outbox
        # The loop's own calls (stats, kv_digest) and the worker's (`worker_calls`).
        self.calls: dict[str, Callable] = {"stats": engine.snapshot, "kv_digest": self.kv_digest, **(calls or {})}
        # An abort can overtake its add when the transport does not keep order (a threaded actor):
        # remember such aborts so the add that follows is refused at once.
        self._early_aborts: dict[str, float] = {}  # request id -> when (time.monotonic)
        self._finished: dict[str, float] = {}  # ids that ended lately -> when: their aborts are late
        self._owners: dict[str, str] = {}  # live request id -> the client that added it
        self._added: dict[str, int] = {}  # highest AddRequest.seq taken, per client (clients match placements)
        self._kv_seq = 0  # KVEvents sent so far
        self._last_load = engine.load()  # an idle engine sends nothing until something changes
        self._busy = False  # read by health checks on other threads; written only by run()
        self.stopped = threading.Event()

    def progress(self) -> Progress:
        """Safe from any thread: the loop thread only ever replaces these values."""
        return Progress(self.engine.stats.steps, self._busy or not self.inbox.empty())

    def run(self) -> None:
        try:
            while True:
                outputs: list[RequestOutput] = []
                for msg in drain(self.inbox, None if self.engine.has_work() else 0.5):
                    if isinstance(msg, Shutdown):
                        self._flush(outputs)
                        return
                    self._handle(msg, outputs)
                self._busy = self.engine.has_work()
                if self._busy:
                    outputs += self.engine.step()
                else:
                    self.engine.executor.idle()
                self._flush(outputs)
                self._publish()
        except Exception as e:  # a broken collective or a bug: the replica cannot go on
            log.error("engine loop failed:\n%s", traceback.format_exc())
            self.outbox.put(Fatal(f"{type(e).__name__}: {e}", group_lost=group_lost(e)))
            raise
        finally:
            self.stopped.set()
            self.engine.executor.shutdown()

    def _flush(self, outputs: list[RequestOutput]) -> None:
        """One message per client that has outputs this step; finished requests lose their owner."""
        if not outputs:
            return
        by_client: dict[str, list[RequestOutput]] = {}
        for out in outputs:
            if out.finished:
                self._remember_finished(out.request_id)
            owner = self._owners.pop(out.request_id, "") if out.finished else self._owners.get(out.request_id, "")
            by_client.setdefault(owner, []).append(out)
        stats = self.engine.snapshot()
        for client_id, outs in by_client.items():
            self.outbox.put(StepOutputs(outs, stats, client_id))

    def _publish(self) -> None:
        """One KVEvents to every client when the cache's keys or the engine's load changed."""
        stored, removed = self.engine.block_manager.events.take()
        load = self.engine.load(tuple(self._added.items()))
        if not stored and not removed and load == self._last_load:
            return
        self._kv_seq += 1
        self._last_load = load
        self.outbox.put(KVEvents(self._kv_seq, stored, removed, load))

    def kv_digest(self) -> KVDigest:
        """Every findable key, consistent with the KVEvents sent so far (runs on the loop thread)."""
        self._publish()  # events not yet sent would fall between the digest and the next message
        return self.engine.kv_digest(self._kv_seq)

    def _handle(self, msg, outputs: list[RequestOutput]) -> None:
        if isinstance(msg, AddRequest):
            self._add(msg, outputs)
        elif isinstance(msg, AbortRequest):
            self._abort(msg.request_id, outputs)
        elif isinstance(msg, Detach):
            self._added.pop(msg.client_id, None)
            for rid in [r for r, c in self._owners.items() if c == msg.client_id]:
                self._abort(rid, outputs)
        elif isinstance(msg, Call):
            self._call(msg)
        else:
            log.warning("ignoring unknown engine message %r", type(msg).__name__)

    def _add(self, msg: AddRequest, outputs: list[RequestOutput]) -> None:
        rid = msg.request_id
        # The client's own number, not a count here: a Detach that forgets the client cannot make
        # the two disagree (adds may arrive out of order, hence max).
        self._added[msg.client_id] = max(self._added.get(msg.client_id, 0), msg.seq)
        if rid in self.engine.live:  # clients keep their ids unique, so this is a client's bug
            log.error("ignoring a second add of live request %r from client %r", rid, msg.client_id)
            return
        self._owners[rid] = msg.client_id
        self._finished.pop(rid, None)
        aborted_at = self._early_aborts.pop(rid, None)
        if aborted_at is not None and time.monotonic() - aborted_at <= EARLY_ABORT_TTL_S:
            outputs.append(RequestOutput(rid, finished=True, finish_reason="abort",
                                         prompt_tokens=len(msg.prompt_token_ids)))
            return
        try:
            self.engine.add_request(rid, msg.prompt_token_ids, msg.params, msg.output_prefix)
        except TpserveError as e:
            field = getattr(e, "field", None)
            outputs.append(RequestOutput(rid, finished=True, finish_reason="error",
                                         error=e.message if field else str(e), error_field=field,
                                         prompt_tokens=len(msg.prompt_token_ids)))
        except Exception as e:  # the request's own data broke a check: it fails alone
            outputs.append(self.engine.fail_request(rid, e))

    def _remember_finished(self, rid: str) -> None:
        """An abort that arrives after its request ended (refused, failed, done) is a late one,
        not an early one: it must not refuse a retry that reuses the id."""
        now = time.monotonic()
        self._finished.pop(rid, None)
        self._finished[rid] = now
        while self._finished and (len(self._finished) > 10_000
                                  or now - next(iter(self._finished.values())) > EARLY_ABORT_TTL_S):
            self._finished.pop(next(iter(self._finished)))

    def _abort(self, rid: str, outputs: list[RequestOutput]) -> None:
        if rid in self._finished:
            return
        try:
            out = self.engine.abort(rid)
        except Exception as e:  # detokenizing its last delta failed: it still ends, with an error
            out = self.engine.fail_request(rid, e)
        if out is not None:
            outputs.append(out)
        elif rid not in self.engine.live:
            now = time.monotonic()
            self._early_aborts[rid] = now
            # An abort that overtook its add is followed by that add within moments; older records
            # are aborts of requests that had already finished, and must not refuse a retry that
            # reuses the id.
            while self._early_aborts and (len(self._early_aborts) > 10_000
                                          or now - next(iter(self._early_aborts.values())) > EARLY_ABORT_TTL_S):
                self._early_aborts.pop(next(iter(self._early_aborts)))

    def _call(self, msg: Call) -> None:
        try:
            call = self.calls.get(msg.method)
            if call is None:
                raise TpserveError(f"unknown engine call {msg.method!r}")
            value = call(*msg.args, **msg.kwargs)
            self.outbox.put(CallResult(msg.call_id, True, value, msg.client_id))
        except Exception as e:
            self.outbox.put(CallResult(msg.call_id, False, e, msg.client_id))

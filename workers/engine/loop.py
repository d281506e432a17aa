"""The loop rank 0 runs: take requests between steps, step while there is work, and ship each
step's deltas as one message. Channels are queue-like (queue.Queue in-process, multiprocessing
queues across processes, an actor's mailbox under Ray), so the loop does not know its host.

Inbox messages:  ("add", id, prompt_ids, params, output_prefix) | ("abort", id) | ("call", n, method, args, kwargs) | ("shutdown",)
Outbox messages: ("step", [RequestOutput], EngineStats) | ("result", n, ok, value) | ("fatal", message)
"""
from __future__ import annotations

import logging
import queue
import traceback

from workers.engine.core import EngineCore
from workers.engine.outputs import RequestOutput
from workers.errors import TpserveError

log = logging.getLogger(__name__)

# Calls the client may make on rank 0, and who answers them.
WORKER_CALLS = {"prefill_logits", "load_report", "set_comm_timing", "info"}


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


class EngineLoop:
    def __init__(self, engine: EngineCore, inbox, outbox):
        self.engine, self.inbox, self.outbox = engine, inbox, outbox
        self.heartbeat_s = min(5.0, engine.worker.spec.collective_timeout_s / 4)
        # An abort can overtake its add when the transport does not keep order (a threaded actor):
        # remember such aborts so the add that follows is refused at once.
        self._early_aborts: dict[str, None] = {}

    def run(self) -> None:
        try:
            while True:
                outputs: list[RequestOutput] = []
                for msg in drain(self.inbox, None if self.engine.has_work() else 0.5):
                    if msg[0] == "shutdown":
                        self._flush(outputs)
                        return
                    self._handle(msg, outputs)
                if self.engine.has_work():
                    outputs += self.engine.step()
                else:
                    self.engine.worker.heartbeat(self.heartbeat_s)
                self._flush(outputs)
        except Exception as e:  # a broken collective or a bug: the replica cannot go on
            log.error("engine loop failed:\n%s", traceback.format_exc())
            self.outbox.put(("fatal", f"{type(e).__name__}: {e}"))
            raise
        finally:
            self.engine.worker.stop_followers()

    def _flush(self, outputs: list[RequestOutput]) -> None:
        if outputs:
            self.outbox.put(("step", outputs, self.engine.snapshot()))

    def _handle(self, msg: tuple, outputs: list[RequestOutput]) -> None:
        kind = msg[0]
        if kind == "add":
            _, request_id, prompt_ids, params, output_prefix = msg
            if self._early_aborts.pop(request_id, 1) is None:
                outputs.append(RequestOutput(request_id, finished=True, finish_reason="abort",
                                             prompt_tokens=len(prompt_ids)))
                return
            try:
                self.engine.add_request(request_id, prompt_ids, params, output_prefix)
            except TpserveError as e:
                outputs.append(RequestOutput(request_id, finished=True, finish_reason="error", error=str(e),
                                             error_field=getattr(e, "field", None), prompt_tokens=len(prompt_ids)))
        elif kind == "abort":
            out = self.engine.abort(msg[1])
            if out is not None:
                outputs.append(out)
            elif msg[1] not in self.engine.live:
                self._early_aborts[msg[1]] = None
                while len(self._early_aborts) > 10_000:  # aborts of long-finished requests: forget them
                    self._early_aborts.pop(next(iter(self._early_aborts)))
        elif kind == "call":
            _, call_id, method, args, kwargs = msg
            try:
                if method == "stats":
                    value = self.engine.snapshot()
                elif method in WORKER_CALLS:
                    value = getattr(self.engine.worker, method)(*args, **kwargs)
                else:
                    raise TpserveError(f"unknown engine call {method!r}")
                self.outbox.put(("result", call_id, True, value))
            except Exception as e:
                self.outbox.put(("result", call_id, False, e))
        else:
            log.warning("ignoring unknown engine message %r", kind)

"""The caller's side of a replica's engine: submit requests, stream their deltas, abort, call.

A reader thread takes the engine's per-step messages and hands each delta to its request's
stream. Streams iterate synchronously or, when made with an event loop, asynchronously.

Several clients may share one engine (one per frontend). Each has a `client_id`, and the engine
knows each request by `client_id:request_id`, so two frontends may use the same request id.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from workers.engine.messages import (AbortRequest, AddRequest, Call, CallResult, Detach, EngineLoad, Fatal,
                                     KVEvents, StepOutputs)
from workers.engine.outputs import EngineStats, RequestOutput
from workers.engine.sampling_params import SamplingParams
from workers.errors import ConfigError, RequestFailed, WorkerError

log = logging.getLogger(__name__)


class ReplicaLost(WorkerError):
    """The replica serving a request died or was replaced. `failed`: its engine raised (the
    request may be the cause) rather than the process vanishing (SIGKILL, a lost node)."""

    def __init__(self, message: str, failed: bool = False):
        super().__init__(message)
        self.failed = failed


def raise_for(out: RequestOutput) -> None:
    if out.finish_reason != "error":
        return
    if out.replica_lost:
        raise ReplicaLost(out.error or "the replica was lost", failed=out.replica_failed)
    if out.request_failed:
        raise RequestFailed(out.error or "the engine failed on this request")
    if out.error_field:
        raise ConfigError(out.error_field, out.error or "is not valid")
    raise WorkerError(out.error or "request failed")


@dataclass(slots=True)
class Completion:
    """A finished request, its deltas joined."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list[dict | None] | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    computed_prompt_tokens: int = 0
    num_preemptions: int = 0
    num_deltas: int = 0

    def add(self, out: RequestOutput) -> None:
        self.token_ids += out.new_token_ids
        self.text += out.new_text
        self.logprobs += out.logprobs or []
        if out.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_deltas += 1
        self.prompt_tokens = out.prompt_tokens
        self.cached_prompt_tokens = out.cached_prompt_tokens
        self.computed_prompt_tokens = out.computed_prompt_tokens
        self.num_preemptions = out.num_preemptions
        if out.finished:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason


class RequestStream:
    """Deltas of one request, in order; iteration ends after the finished one."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None = None):
        self.request_id = request_id
        self._loop = loop
        self._q: queue.Queue | asyncio.Queue = asyncio.Queue() if loop else queue.Queue()
        self.finished = False  # the last delta (or an error that ended it) was taken: nothing to abort

    def push(self, out: RequestOutput) -> None:  # reader thread
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._q.put_nowait, out)
        else:
            self._q.put(out)

    def __iter__(self):
        while True:
            out = self._q.get()
            self.finished = out.finished
            raise_for(out)
            yield out
            if out.finished:
                return

    async def __aiter__(self):
        while True:
            out = await self._q.get()
            self.finished = out.finished
            raise_for(out)
            yield out
            if out.finished:
                return

    def result(self) -> Completion:
        c = Completion(self.request_id)
        for out in self:
            c.add(out)
        return c


class EngineClient:
    def __init__(self, inbox, outbox, is_alive: Callable[[], bool], client_id: str = ""):
        self._inbox, self._outbox, self._is_alive = inbox, outbox, is_alive
        self.client_id = client_id
        self._streams: dict[str, RequestStream] = {}  # by engine id
        self._calls: dict[int, Future] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.stats = EngineStats()
        self.load = EngineLoad()  # the engine's own load, from its latest KVEvents
        self.sent = 0  # AddRequests this client has sent, = the last one's seq (EngineLoad.added_by: taken)
        # Called on the reader thread with each KVEvents (a router's cache index listens here).
        self.on_kv_events: Callable[[KVEvents], None] | None = None
        self.dead: str | None = None
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="engine-client-reader", daemon=True)
        self._reader.start()

    # ---- requests ------------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    loop: asyncio.AbstractEventLoop | None = None,
                    output_prefix: list[int] | None = None) -> RequestStream:
        """Submit a request; `output_prefix` resumes one whose first tokens were already streamed."""
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(request_id, loop)
        engine_id = self._engine_id(request_id)
        with self._lock:
            if self.dead:
                stream.push(RequestOutput(request_id, finished=True, finish_reason="error", error=self.dead,
                                          replica_lost=True))
                return stream
            if engine_id in self._streams:
                raise ConfigError("request_id", f"{request_id!r} is already in flight")
            self._streams[engine_id] = stream
            self.sent += 1
            seq = self.sent
        self._inbox.put(AddRequest(engine_id, list(prompt_token_ids), params, list(output_prefix or []),
                                   self.client_id, seq))
        return stream

    def _engine_id(self, request_id: str) -> str:
        return f"{self.client_id}:{request_id}" if self.client_id else request_id

    def abort(self, request_id: str) -> None:
        self._inbox.put(AbortRequest(self._engine_id(request_id)))

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Submit all prompts at once (they batch in the engine) and wait for every completion."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        streams = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        return [s.result() for s in streams]

    def call(self, method: str, *args, timeout: float | None = None, **kwargs):
        return self.call_async(method, *args, **kwargs).result(timeout)

    def call_async(self, method: str, *args, **kwargs) -> Future:
        """Send a call without waiting (safe on the reader thread, e.g. from `on_kv_events`)."""
        fut: Future = Future()
        with self._lock:
            if self.dead:
                fut.set_exception(WorkerError(self.dead))
                return fut
            call_id = next(self._ids)
            self._calls[call_id] = fut
        self._inbox.put(Call(call_id, method, args, kwargs, self.client_id))
        return fut

    # ---- reader ----------------------------------------------------------------------------------------
    def _read(self) -> None:
        while not self._closed:
            try:
                msg = self._outbox.get(timeout=0.2)
            except queue.Empty:
                if not self._is_alive():
                    self._fail_all("a rank of the replica died")
                    return
                continue
            except (EOFError, OSError):
                self._fail_all("the replica's channel closed")
                return
            if isinstance(msg, StepOutputs):
                self.stats = msg.stats
                for out in msg.outputs:
                    with self._lock:
                        stream = self._streams.pop(out.request_id, None) if out.finished \
                            else self._streams.get(out.request_id)
                    if stream is not None:
                        out.request_id = stream.request_id  # the caller's id, not the engine's
                        stream.push(out)
            elif isinstance(msg, KVEvents):
                self.load = msg.load
                if self.on_kv_events is not None:
                    try:
                        self.on_kv_events(msg)
                    except Exception:  # a listener's bug must not stop this replica's streams
                        log.exception("a KVEvents listener failed")
            elif isinstance(msg, CallResult):
                fut = self._calls.pop(msg.call_id, None)
                if fut is not None:
                    fut.set_result(msg.value) if msg.ok else fut.set_exception(msg.value)
            elif isinstance(msg, Fatal):
                self._fail_all(f"replica failed: {msg.message}", failed=not msg.group_lost)
                return

    def fail(self, reason: str) -> None:
        """Give up on this replica (its controller replaced it): every open stream ends with a
        WorkerError now, so its requests can be resumed elsewhere."""
        self._fail_all(reason)

    def _fail_all(self, reason: str, failed: bool = False) -> None:
        """`failed`: the replica's engine raised (a Fatal), not just a lost channel."""
        with self._lock:
            self.dead = self.dead or reason
            streams, self._streams = self._streams, {}
            calls, self._calls = self._calls, {}
        for s in streams.values():
            s.push(RequestOutput(s.request_id, finished=True, finish_reason="error", error=f"WorkerError: {reason}",
                                 replica_lost=True, replica_failed=failed))
        for fut in calls.values():
            fut.set_exception(WorkerError(reason))

    def detach(self) -> None:
        """Tell a shared engine to abort what this client still has running (even when this
        client's channel failed: the engine may still be up)."""
        if self.client_id:
            self._inbox.put(Detach(self.client_id))

    def close(self, timeout_s: float = 5.0, detach: bool = False) -> None:
        """Stop the reader; it returns within one poll, so nothing calls the transport after this.
        `detach`: also tell a shared engine to abort what this client still has running."""
        if detach and self.client_id and self.dead is None:
            try:
                self._inbox.put(Detach(self.client_id))
            except Exception:  # the replica is already gone: nothing of ours runs there
                pass
        self._closed = True
        if self._reader is not threading.current_thread():
            self._reader.join(timeout_s)

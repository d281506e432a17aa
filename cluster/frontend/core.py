"""The one request path both APIs use: route a checked request onto a replica, stream its
deltas, meter it, and abort it in the engine when the client cancels or its deadline passes."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from cluster.frontend.errors import classify
from cluster.frontend.request import FrontendRequest
from cluster.frontend.tokenize import PromptEncoder
from cluster.frontend.validate import ModelLimits, check_prompt_ids
from cluster.metrics import Metrics
from cluster.router import Overloaded, Router, Unavailable
from workers.engine.outputs import RequestOutput
from workers.engine.client import ReplicaLost
from workers.errors import RequestFailed

log = logging.getLogger(__name__)

# A request in flight on this many replicas whose engines failed is not resumed again.
DEAD_LETTER_FAILURES = 2


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The gRPC status for an error we expect (`errors.TABLE`); None for a bug."""
    status = classify(exc)
    return None if status is None else (status.grpc_code, str(exc))


def abort_on_error(handler):
    """Unary handlers: an expected error becomes its gRPC status; anything else stays a bug."""
    import functools

    @functools.wraps(handler)
    async def wrapped(self, request, context):
        try:
            return await handler(self, request, context)
        except Exception as e:
            status = status_of(e)
            if status is None:
                raise
            await context.abort(*status)

    return wrapped


class Frontend:
    """The request path: admit, place on a replica, stream, and resume on another replica when the
    one serving a request is lost (from the prompt plus every token the client already has)."""

    def __init__(self, router: Router, encoder: PromptEncoder, limits: ModelLimits, model_info: dict, metrics: Metrics,
                 resume_timeout_s: float = 60.0, max_resumes: int = 3):
        self.router, self.encoder, self.limits = router, encoder, limits
        self.model_info, self.metrics = model_info, metrics
        self.resume_timeout_s, self.max_resumes = resume_timeout_s, max_resumes
        self.resumed = 0  # requests continued on another replica, since start
        self.quarantined = 0  # requests refused a further resume by the dead-letter rule

    async def stream(self, request: FrontendRequest) -> AsyncIterator[RequestOutput]:
        """Deltas of one request. Admission comes first, then tokenizing (off the event loop), so a
        flood of large prompts is refused or queued before any of them costs tokenizer time."""
        prompt, params, deadline = request.prompt, request.params, request.deadline
        request_id = request.request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        try:
            self.router.admit(request_id)
        except Overloaded:
            self.metrics.refused.inc()
            raise
        self.metrics.running.set(self.router.in_flight)
        start = last = time.monotonic()
        received: list[int] = []  # every token the client has been given, across replicas
        finished, placement, resumes, failed = False, None, 0, 0
        try:
            prompt_ids = await self.encoder.encode(prompt)
            if request.fill_max_tokens:
                params.max_tokens = max(1, min(params.max_tokens, self.limits.max_model_len - len(prompt_ids)))
            check_prompt_ids(prompt_ids, params.max_tokens, self.limits, prompt.field)
            keys = await self.encoder.run(self.router.block_keys, prompt_ids, params.cache_salt)
            while not finished:
                placement = self.router.place(prompt_ids, keys, params, request_id, loop, received)
                self.metrics.routed.labels(placement.reason).inc()
                try:
                    async for out in placement.stream:
                        now = time.monotonic()
                        n = len(out.new_token_ids)
                        if n:
                            if not received:
                                self.metrics.ttft.observe(now - start)
                            else:
                                self.metrics.itl.observe(now - last)
                            last = now
                            received += out.new_token_ids
                            self.metrics.generated.inc(n)
                        finished = out.finished
                        yield out
                except ReplicaLost as lost:
                    placement.close()
                    placement = None
                    failed += lost.failed
                    if failed >= DEAD_LETTER_FAILURES:
                        # Dead-letter rule: a request in flight on two replicas whose engines
                        # raised is the likely cause; resuming it would take down a third.
                        self.quarantined += 1
                        self.metrics.quarantined.inc()
                        log.error("request %s quarantined: in flight on %d replicas that failed (%s)",
                                  request_id, failed, lost)
                        raise RequestFailed(f"request {request_id} was in flight on {failed} replicas that "
                                            f"failed; not retried") from None
                    resumes += 1
                    if resumes > self.max_resumes:
                        raise Unavailable(f"request {request_id} lost {resumes} replicas (--max-resumes "
                                          f"{self.max_resumes}); giving up") from None
                    await self._wait_for_replica(request_id, deadline, str(lost))
                    self.resumed += 1
                    self.metrics.resumed.inc()
                    log.warning("request %s resumes after %d streamed tokens (%s)", request_id, len(received), lost)
            self.metrics.e2e.observe(time.monotonic() - start)
        finally:
            if placement is not None:
                # Cancelled, past its deadline, or the consumer went away: free its blocks now. A
                # stream the engine ended (refused, failed) has nothing left to abort.
                if not finished and placement.abort():
                    self.metrics.aborted.inc()
                placement.close()
            self.router.done(request_id)
            self.metrics.running.set(self.router.in_flight)

    async def _wait_for_replica(self, request_id: str, deadline: float | None, reason: str) -> None:
        """Until a replica is ready, for at most min(the request's deadline, the resume timeout)."""
        limit = self.resume_timeout_s
        if deadline is not None:
            limit = min(limit, deadline - time.monotonic())
        end = time.monotonic() + limit
        while not self.router.ready:
            if time.monotonic() >= end:
                raise Unavailable(f"the replica serving request {request_id} failed ({reason}) and none was ready "
                                  f"within {max(0.0, limit):.1f} s to resume it")
            await asyncio.sleep(0.05)


def deadline_of(context) -> float | None:
    """The RPC's deadline on the time.monotonic clock (None when the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining

"""The one request path both APIs use: route a checked request onto a replica, stream its
deltas, meter it, and abort it in the engine when the client cancels or its deadline passes."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from cluster.frontend.validate import InvalidArgument, ModelLimits, NotFound
from cluster.metrics import Metrics
from cluster.router import Overloaded, Router, Unavailable
from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import SamplingParams
from workers.errors import ConfigError, WorkerError

log = logging.getLogger(__name__)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The gRPC status for an error we expect; None for a bug."""
    if isinstance(exc, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, ConfigError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (Unavailable, WorkerError)):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    return None


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
    def __init__(self, router: Router, encoder, limits: ModelLimits, model_info: dict, metrics: Metrics):
        self.router, self.encoder, self.limits = router, encoder, limits
        self.model_info, self.metrics = model_info, metrics

    async def stream(self, prompt_ids: list[int], params: SamplingParams,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        try:
            handle, stream = self.router.submit(prompt_ids, params, request_id, loop)
        except Overloaded:
            self.metrics.refused.inc()
            raise
        self.metrics.running.set(self.router.in_flight)
        start = last = time.monotonic()
        budget = len(prompt_ids) + params.max_tokens
        generated, finished, first = 0, False, True
        try:
            async for out in stream:
                now = time.monotonic()
                n = len(out.new_token_ids)
                if n:
                    if first:
                        self.metrics.ttft.observe(now - start)
                        self.router.progress(handle, len(prompt_ids))
                        budget -= len(prompt_ids)
                        first = False
                    else:
                        self.metrics.itl.observe(now - last)
                    last = now
                    generated += n
                    budget -= n
                    self.router.progress(handle, n)
                finished = out.finished
                yield out
            self.metrics.e2e.observe(time.monotonic() - start)
        finally:
            if not finished:  # cancelled, deadline, or the consumer went away: free its blocks now
                handle.client.abort(request_id)
                self.metrics.aborted.inc()
            self.router.done(handle, max(0, budget))
            self.metrics.running.set(self.router.in_flight)
            self.metrics.generated.inc(generated)

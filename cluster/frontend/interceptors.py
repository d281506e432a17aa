"""Server interceptors: bearer-token auth, and request decoding that fails with a status.

Both wrap the method handler grpc found, keeping its kind (unary or streaming on either side),
so every service (tpserve.v1, KServe v2, reflection) gets them without code of its own.
"""
from __future__ import annotations

import hmac
import inspect
import logging

import grpc
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
# Streams that report a bad message in-stream (Triton's decoupled convention) instead of ending.
IN_STREAM_ERRORS = frozenset({"/inference.GRPCInferenceService/ModelStreamInfer"})


class Undecodable:
    """Stands in for a request message that did not parse (bad wire format, invalid UTF-8 in a
    string field), so the handler can answer INVALID_ARGUMENT instead of grpc's INTERNAL."""

    __slots__ = ("type_name",)
    field = "request"

    def __init__(self, type_name: str):
        self.type_name = type_name

    @property
    def reason(self) -> str:
        return f"not a valid {self.type_name} message (malformed bytes or a string field that is not UTF-8)"

    @property
    def message(self) -> str:
        return f"{self.field}: {self.reason}"


def _rebuild(handler: grpc.RpcMethodHandler, behavior, request_deserializer) -> grpc.RpcMethodHandler:
    kind = ("unary_unary" if handler.unary_unary else "unary_stream" if handler.unary_stream
            else "stream_unary" if handler.stream_unary else "stream_stream")
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(behavior, request_deserializer=request_deserializer, response_serializer=handler.response_serializer)


def _behavior(handler: grpc.RpcMethodHandler):
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str):
    """A behavior of the handler's kind that ends the call with (code, message)."""
    if handler.unary_stream or handler.stream_stream:
        async def deny_stream(request, context):
            await context.abort(code, message)
            yield  # an async generator, as grpc expects for a streaming response
        return deny_stream

    async def deny(request, context):
        await context.abort(code, message)
    return deny


class DecodeInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        type_name = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
        type_name = type_name.full_name if type_name is not None else "request"

        def safe_parse(data: bytes):
            try:
                return parse(data)
            except (DecodeError, UnicodeDecodeError, ValueError):
                return Undecodable(type_name)

        inner = _behavior(handler)
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if handler.stream_unary or handler.stream_stream:
            if details.method in IN_STREAM_ERRORS:
                return _rebuild(handler, inner, safe_parse)  # the servicer answers each bad message

            def first_arg(request_iterator, context):
                async def checked():
                    async for request in request_iterator:
                        if isinstance(request, Undecodable):
                            await context.abort(bad, request.message)
                        yield request
                return checked()
        else:
            def first_arg(request, context):
                return request

            async def check(request, context):
                if isinstance(request, Undecodable):
                    await context.abort(bad, request.message)

        streaming_in = bool(handler.stream_unary or handler.stream_stream)
        # Keep the handler's style: an async generator stays one; a coroutine (unary replies, or
        # streams written with context.write, like the health service's Watch) stays a coroutine.
        if inspect.isasyncgenfunction(inner):
            async def behavior(request, context):
                if not streaming_in:
                    await check(request, context)
                async for reply in inner(first_arg(request, context), context):
                    yield reply
        else:
            async def behavior(request, context):
                if not streaming_in:
                    await check(request, context)
                return await inner(first_arg(request, context), context)
        return _rebuild(handler, behavior, safe_parse)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """`authorization: Bearer <token>` on every call but health checks (probes carry no token).

    The comparison is constant-time over bytes; neither the expected nor a presented token is
    ever logged or echoed in a status message.
    """

    def __init__(self, token: str, on_refused=None):
        self._expected = f"Bearer {token}".encode()
        self._on_refused = on_refused

    def _authorized(self, metadata) -> bool:
        presented = [v for k, v in (metadata or ()) if k == "authorization"]
        if len(presented) != 1:
            return False
        value = presented[0].encode() if isinstance(presented[0], str) else bytes(presented[0])
        return hmac.compare_digest(value, self._expected)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX) or self._authorized(details.invocation_metadata):
            return handler
        if self._on_refused is not None:
            self._on_refused()
        log.info("refused %s: missing or wrong bearer token", details.method)
        return _rebuild(handler, _deny(handler, grpc.StatusCode.UNAUTHENTICATED,
                                       "a valid 'authorization: Bearer <token>' metadata entry is required"),
                        handler.request_deserializer)

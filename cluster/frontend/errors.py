"""One table from the errors a request can meet to the status each API answers with.

The servicers (gRPC: tpserve.v1, KServe) and the OpenAI HTTP API both look an exception up here;
an exception not in the table is a bug (the caller logs it and answers UNKNOWN / 500).
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from cluster.frontend.validate import NotFound
from cluster.router import AlreadyExists, Overloaded, Unavailable
from workers.errors import ConfigError, RequestFailed, WorkerError


@dataclass(frozen=True, slots=True)
class Status:
    grpc_code: grpc.StatusCode
    http_status: int
    http_type: str  # OpenAI's error "type"
    http_code: str | None = None  # OpenAI's error "code"


# In order: the first class an exception is an instance of decides (ReplicaLost is a WorkerError).
TABLE: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], Status], ...] = (
    (ConfigError, Status(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error")),  # names its field
    (NotFound, Status(grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error", "model_not_found")),
    (AlreadyExists, Status(grpc.StatusCode.ALREADY_EXISTS, 409, "invalid_request_error")),
    (Overloaded, Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error", "rate_limit_exceeded")),
    (RequestFailed, Status(grpc.StatusCode.INTERNAL, 500, "server_error", "request_failed")),
    ((Unavailable, WorkerError), Status(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable")),
)


def classify(exc: BaseException) -> Status | None:
    for kind, status in TABLE:
        if isinstance(exc, kind):
            return status
    return None

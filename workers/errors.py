"""Typed errors: bad input or config names the field and the allowed range."""


class TpserveError(Exception):
    """Base of every error tpserve raises on purpose."""


class ConfigError(TpserveError, ValueError):
    """A configuration value is out of range; the message names the field."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


class ModelNotFoundError(TpserveError, FileNotFoundError):
    """The model argument names no folder, file or built-in model."""


class UnsupportedArchitectureError(TpserveError, ValueError):
    """The checkpoint's architecture has no tpserve implementation."""


class CheckpointError(TpserveError, ValueError):
    """A checkpoint lacks a tensor or holds one of the wrong shape."""


class WorkerError(TpserveError, RuntimeError):
    """A rank of a worker group failed or went away."""


class RequestFailed(TpserveError):
    """The engine failed on one request (its own data hit a bug or a kernel's limit). The request
    ends with this error and is not retried elsewhere, where it would fail the same way."""


class PortInUse(ConfigError):
    """A port flag names a port another process holds; the field is the flag."""

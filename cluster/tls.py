"""TLS and token credentials, for the server and for our clients (tpserve client, tpserve bench).

Server: a certificate and key (`--tls-cert`, `--tls-key`); with `--tls-client-ca` clients must
present a certificate signed by that CA (mutual TLS). Token: one line in `--auth-token-file`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from workers.errors import ConfigError


def _read(flag: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(flag, f"cannot read {path}: {e.strerror}") from None
    if not data.strip():
        raise ConfigError(flag, f"{path} is empty")
    return data


def read_token(path: str | None, flag: str = "auth-token-file") -> str | None:
    """The bearer token in a file (surrounding whitespace dropped); never printed."""
    data = _read(flag, path)
    if data is None:
        return None
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(flag, f"{path} must hold an ASCII token") from None
    if any(c.isspace() for c in token) or len(token) < 16:
        raise ConfigError(flag, f"{path} must hold one token of at least 16 characters and no spaces")
    return token


@dataclass(slots=True)
class ServerTLS:
    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    def validate(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("tls-cert" if self.cert is None else "tls-key", "--tls-cert and --tls-key go together")
        if self.client_ca is not None and self.cert is None:
            raise ConfigError("tls-client-ca", "mutual TLS needs --tls-cert and --tls-key too")
        for flag, path in (("tls-cert", self.cert), ("tls-key", self.key), ("tls-client-ca", self.client_ca)):
            _read(flag, path)

    def credentials(self) -> grpc.ServerCredentials:
        ca = _read("tls-client-ca", self.client_ca)
        return grpc.ssl_server_credentials([(_read("tls-key", self.key), _read("tls-cert", self.cert))],
                                           root_certificates=ca, require_client_auth=ca is not None)


@dataclass(slots=True)
class ClientSecurity:
    """How a client reaches a server: TLS material and a token file (all optional)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    token_file: str | None = None

    @classmethod
    def from_args(cls, args) -> "ClientSecurity":
        return cls(args.tls_ca, args.tls_cert, args.tls_key, args.auth_token_file)

    def channel(self, target: str, options=None, aio: bool = False):
        return client_channel(target, self.ca, self.cert, self.key, self.token_file, options=options, aio=aio)


def add_client_arguments(p) -> None:
    p.add_argument("--tls-ca", default=None, help="PEM CA of the server's certificate (turns TLS on)")
    p.add_argument("--tls-cert", default=None, help="client certificate for mutual TLS")
    p.add_argument("--tls-key", default=None, help="client key for mutual TLS")
    p.add_argument("--auth-token-file", default=None, help="file holding the bearer token")


def client_channel(target: str, ca: str | None = None, cert: str | None = None, key: str | None = None,
                   token_file: str | None = None, options=None, aio: bool = False):
    """(channel, call metadata) for a tpserve server: plaintext, or TLS when `ca` is given (plus a
    client certificate for mutual TLS); the metadata carries the bearer token when one is given."""
    mk = grpc.aio if aio else grpc
    token = read_token(token_file, "auth-token-file")
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    if ca is None:
        if cert or key:
            raise ConfigError("tls-cert", "a client certificate needs --tls-ca (the server's CA) too")
        host = target.rsplit(":", 1)[0].strip("[]")
        if token is not None and host not in ("127.0.0.1", "localhost", "::1"):
            # A token is a secret: over plaintext only to this machine (tests, kubectl port-forward).
            raise ConfigError("auth-token-file", "a bearer token is sent only over TLS beyond loopback; give --tls-ca")
        return mk.insecure_channel(target, options=options), metadata
    if (cert is None) != (key is None):
        raise ConfigError("tls-cert", "--tls-cert and --tls-key go together")
    creds = grpc.ssl_channel_credentials(_read("tls-ca", ca), _read("tls-key", key), _read("tls-cert", cert))
    return mk.secure_channel(target, creds, options=options), metadata

"""What travels between an engine's clients and the loop on rank 0: one small dataclass a kind.

Several clients (one per frontend) may share one engine. Each message from a client names it, so
the loop can answer that client alone: step outputs go to the client that added the request, call
results to the caller. `client_id` "" is the only client of a local worker group.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from workers.engine.outputs import EngineStats, RequestOutput
from workers.engine.sampling_params import SamplingParams


# ---- client -> engine (the inbox) -------------------------------------------------------------------
@dataclass(slots=True)
class AddRequest:
    """Queue a request. `request_id` is the engine's id (unique across clients, see EngineClient);
    `output_prefix` holds tokens a lost replica already streamed (the request resumes after them)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    output_prefix: list[int] = field(default_factory=list)
    client_id: str = ""
    # The client's number for this add (1, 2, ...): the engine reports the highest it has taken,
    # so the client's count and the engine's never drift apart (not even after a Detach).
    seq: int = 0


@dataclass(slots=True)
class AbortRequest:
    request_id: str


@dataclass(slots=True)
class Call:
    """Run `method` on rank 0 between steps; the answer is a CallResult to `client_id`."""

    call_id: int
    method: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    client_id: str = ""


@dataclass(slots=True)
class Detach:
    """A client is gone (closed, or silent past the host's limit): abort every request it added."""

    client_id: str


@dataclass(slots=True)
class Shutdown:
    pass


# ---- engine -> client (the outbox) ------------------------------------------------------------------
@dataclass(slots=True)
class StepOutputs:
    """One step's deltas for one client's requests, with the engine's counters after the step."""

    outputs: list[RequestOutput]
    stats: EngineStats
    client_id: str = ""


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """The work an engine holds, from its own books (so every frontend reads the same figure):
    prompt tokens still to prefill and tokens its requests may still generate. `added`: the highest
    AddRequest number (`AddRequest.seq`) the engine has taken from each client, so a client can
    tell which of its placements this figure already includes."""

    prefill_tokens: int = 0
    decode_tokens: int = 0
    running: int = 0
    waiting: int = 0
    free_blocks: int = 0
    num_blocks: int = 0
    added: tuple[tuple[str, int], ...] = ()

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens

    def added_by(self, client_id: str) -> int:
        for c, n in self.added:
            if c == client_id:
                return n
        return 0


@dataclass(slots=True)
class KVEvents:
    """Sent to every client after each change: the prefix-cache keys stored and evicted since the
    previous message, and the engine's load. `seq` counts these messages; a client that sees a gap
    (it joined late, or lost one) asks for a `kv_digest` and rebuilds its view from it."""

    seq: int
    stored: list[bytes]
    removed: list[bytes]
    load: EngineLoad
    client_id: str | None = None  # None: every client


@dataclass(slots=True)
class KVDigest:
    """Every key the prefix cache can find now, as of KVEvents number `seq` (a `kv_digest` call)."""

    seq: int
    keys: list[bytes]
    num_blocks: int
    block_size: int


@dataclass(slots=True)
class CallResult:
    call_id: int
    ok: bool
    value: object
    client_id: str = ""


@dataclass(slots=True)
class Fatal:
    """The loop stopped on an error; every client's requests are lost with this replica.
    `group_lost`: the error was the group's (a peer rank died or timed out in a collective), so
    no request on the replica is suspected of causing it."""

    message: str
    group_lost: bool = False


InboxMessage = AddRequest | AbortRequest | Call | Detach | Shutdown
OutboxMessage = StepOutputs | KVEvents | CallResult | Fatal

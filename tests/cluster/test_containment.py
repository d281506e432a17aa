"""The frontend's side of "no request kills a replica", without Ray: the dead-letter rule, lost
polls retried without losing a message, dead channels of listed replicas rebuilt, load books that
survive a detach, no ghost index slots, aborts only of live requests, the served context, the
planner's verdict on a cache too small for one request, and ports in use as one line."""
from __future__ import annotations

import asyncio
import json
import socket
from collections import deque

import pytest
import ray

from cluster.frontend.core import Frontend, status_of
from cluster.frontend.request import FrontendRequest
from cluster.frontend.tokenize import PromptInput
from cluster.frontend.validate import ModelLimits
from cluster.kv_index import KVIndex
from cluster.metrics import Metrics
from cluster.replica import ActorOutbox, ClientOutboxes
from cluster.router import Placement, ReplicaHandle, Router
from cluster.routing import LoadBoard
from workers.config import ModelConfig
from workers.engine.client import EngineClient, ReplicaLost, RequestStream
from workers.engine.messages import EngineLoad, KVEvents, StepOutputs
from workers.engine.outputs import EngineStats, RequestOutput
from workers.engine.sampling_params import SamplingParams
from workers.errors import ConfigError, RequestFailed
from workers.worker import WorkerSpec, served_context


# ---- the dead-letter rule -------------------------------------------------------------------------
class _Stream:
    def __init__(self, outs, error=None):
        self.outs, self.error, self.finished = outs, error, False

    async def __aiter__(self):
        for o in self.outs:
            yield o
        if self.error is not None:
            self.finished = True
            raise self.error


class _Handle:
    replica_id = "r"


class _Placement:
    def __init__(self, stream):
        self.stream, self.reason, self.handle = stream, "load", _Handle()
        self.aborted = 0

    def progress(self, n):
        pass

    def abort(self):
        self.aborted += 1
        return True

    def close(self):
        pass


class FakeRouter:
    """Each place() serves the next scripted stream (one per replica the request reaches)."""

    def __init__(self, streams):
        self.streams, self.placed = deque(streams), 0
        self.ready, self.in_flight = [object()], 0

    def admit(self, rid):
        pass

    def done(self, rid):
        pass

    def block_keys(self, ids, salt):
        return []

    def place(self, ids, keys, params, rid, loop, received):
        self.placed += 1
        return _Placement(self.streams.popleft())


class FakeEncoder:
    async def encode(self, prompt):
        return prompt.token_ids

    async def run(self, fn, *args):
        return fn(*args)


def frontend(streams, max_resumes=3):
    return Frontend(FakeRouter(streams), FakeEncoder(), ModelLimits("m", 100, 64), {}, Metrics(),
                    resume_timeout_s=1.0, max_resumes=max_resumes)


def tok(i, finished=False):
    return RequestOutput("x", new_token_ids=[i], finished=finished, finish_reason="length" if finished else None)


async def _drain(fe):
    got = []
    async for out in fe.stream(FrontendRequest(PromptInput("prompt", token_ids=[1, 2, 3]), SamplingParams(max_tokens=4),
                                               request_id="poison")):
        got += out.new_token_ids
    return got


def test_a_request_in_flight_on_two_failed_replicas_is_not_resumed_again():
    failed = ReplicaLost("replica failed: RuntimeError", failed=True)
    fe = frontend([_Stream([tok(1)], failed), _Stream([], failed), _Stream([tok(2, True)])])
    with pytest.raises(RequestFailed, match="request poison was in flight on 2 replicas that failed; not retried"):
        asyncio.run(_drain(fe))
    assert fe.router.placed == 2 and fe.quarantined == 1 and fe.resumed == 1
    assert status_of(RequestFailed("x"))[0].name == "INTERNAL"


def test_lost_processes_still_resume_up_to_max_resumes():
    lost = ReplicaLost("the replica's channel closed")  # SIGKILL, a lost node: not the request's doing
    fe = frontend([_Stream([tok(1)], lost), _Stream([], lost), _Stream([], lost), _Stream([tok(2, True)])])
    assert asyncio.run(_drain(fe)) == [1, 2] and fe.resumed == 3 and fe.quarantined == 0
    fe = frontend([_Stream([], lost) for _ in range(3)], max_resumes=1)
    with pytest.raises(Exception, match="lost 2 replicas"):  # max_resumes 1: one resume, two replicas
        asyncio.run(_drain(fe))


# ---- a lost poll reply is answered again ----------------------------------------------------------
class _Remote:
    def __init__(self, fn):
        self.remote = fn


class FakeRank0:
    def __init__(self, outboxes):
        self.poll = _Remote(lambda client, timeout, taken: outboxes.poll(client, timeout, taken))


def test_a_transient_actor_error_is_retried_and_loses_no_message(monkeypatch):
    boxes = ClientOutboxes()
    for i in range(3):
        boxes.put(StepOutputs([RequestOutput(f"r{i}")], EngineStats(), "c"))
    calls = []

    def flaky_get(ref, timeout=None):  # the poll ran and took the batch; its reply was lost once
        calls.append(ref)
        if len(calls) == 1:
            raise ray.exceptions.ActorUnavailableError("restarting", None)
        return ref

    monkeypatch.setattr(ray, "get", flaky_get)
    outbox = ActorOutbox(FakeRank0(boxes), "c", retry_s=5.0)
    got = [outbox.get(0.01).outputs[0].request_id for _ in range(3)]
    assert got == ["r0", "r1", "r2"] and outbox.retries == 1


def test_a_channel_stays_down_only_past_the_retry_bound(monkeypatch):
    def down(ref, timeout=None):
        raise ray.exceptions.GetTimeoutError("no answer")

    monkeypatch.setattr(ray, "get", down)
    outbox = ActorOutbox(FakeRank0(ClientOutboxes()), "c", retry_s=0.2)
    with pytest.raises(EOFError, match="retries"):
        outbox.get(0.01)
    assert outbox.retries >= 1


# ---- a dead client of a listed replica is rebuilt ------------------------------------------------
class _QueueInbox:
    def __init__(self):
        self.sent = []

    def put(self, msg):
        self.sent.append(msg)


class _EmptyOutbox:
    def get(self, timeout=0.2):
        import queue
        import time

        time.sleep(min(timeout, 0.05))
        raise queue.Empty


def test_refresh_rebuilds_the_dead_channel_of_a_replica_the_controller_still_lists():
    made = []

    def factory(rank0):
        c = EngineClient(_QueueInbox(), _EmptyOutbox(), is_alive=lambda: True, client_id=f"c{len(made)}")
        made.append(c)
        return c

    router = Router(None, max_num_seqs=4, max_queue_len=0, client_factory=factory)
    router.list_replicas = lambda: [{"replica_id": "a", "state": "ready", "rank0": object(), "workers": [],
                                     "tp_size": 1}]
    router.refresh()
    assert len(router.ready) == 1
    made[0].fail("the replica's channel closed")  # a transient error outlasted the retries
    assert router.ready == []
    router.refresh()
    assert len(router.ready) == 1 and router.replicas["a"].client is made[1] and router.reconnects == 1
    assert made[1].client_id != made[0].client_id
    for c in made:
        c.close()


# ---- load books ---------------------------------------------------------------------------------------
def test_load_drains_after_the_engine_forgot_the_client():
    """The engine reports the highest AddRequest number it took, not a count it may reset (a
    Detach of a client silent for 30 s did), so placements never look unacked forever."""
    client = EngineClient(_QueueInbox(), _EmptyOutbox(), is_alive=lambda: True, client_id="c")
    router = Router(None, max_num_seqs=4, max_queue_len=0)
    h = ReplicaHandle("a", None, client, [], 1)
    router.add_replica(h)
    for _ in range(5):
        client.add_request([1, 2], SamplingParams(max_tokens=4))
        h.book.placed(client.sent, 6)
    assert [m.seq for m in client._inbox.sent] == [1, 2, 3, 4, 5]
    # As the reader thread delivers a report: the listener the router set books it.
    client.on_kv_events(KVEvents(1, [], [], EngineLoad(decode_tokens=10, added=(("c", 3),))))
    assert h.load() == 10 + 2 * 6 and h.book.unacked == 2  # the engine has not counted the last two
    assert router.board.loads[h.slot] == h.load()
    # After a detach, the 5th add re-creates it.
    client.on_kv_events(KVEvents(2, [], [], EngineLoad(decode_tokens=10, added=(("c", 5),))))
    assert h.load() == 10 and h.book.unacked == 0 and router.board.loads[h.slot] == 10
    client.close()


def test_the_load_board_holds_each_replica_s_load_and_a_report_may_overtake_its_placement():
    board = LoadBoard()
    a, b = board.book(0), board.book(1)
    a.placed(1, 100)
    b.report(EngineLoad(prefill_tokens=7, decode_tokens=3), "r")
    assert board.loads == [100, 10] and (a.load, b.load) == (100, 10)
    # The engine took AddRequest 2 and reported it before the router booked the placement:
    # booked late, it is not counted again.
    b.report(EngineLoad(prefill_tokens=40, decode_tokens=3, added=(("r", 2),)), "r")
    b.placed(2, 40)
    assert board.loads[1] == 43 and b.unacked == 0 and b.in_flight == 1
    a.report(EngineLoad(decode_tokens=100, added=(("r", 1),)), "r")
    assert board.loads[0] == 100 and a.unacked == 0
    # A replica that left writes no more: its slot goes to the next replica, from 0.
    a.retire()
    c = board.book(0)
    a.report(EngineLoad(decode_tokens=999), "r")
    assert board.loads[0] == 0 and c.load == 0


def test_late_kv_events_of_a_forgotten_replica_make_no_ghost_slot():
    index = KVIndex()
    index.slot("a")
    index.forget("a")
    assert index.apply("a", KVEvents(1, [b"k" * 16], [], EngineLoad(num_blocks=8))) is False
    assert index.sizes() == {} and "a" not in index._slot


def test_a_placement_aborts_only_a_request_still_live():
    class Client:
        aborts = []

        def abort(self, rid):
            self.aborts.append(rid)

    h = ReplicaHandle("a", None, Client(), [], 1)
    stream = RequestStream("x")
    p = Placement(h, stream, "x", "load", 0)
    stream.push(RequestOutput("x", finished=True, finish_reason="error", error="refused", error_field="max_tokens"))
    with pytest.raises(ConfigError):
        next(iter(stream))
    assert p.abort() is False and Client.aborts == []
    live = Placement(h, RequestStream("y"), "y", "load", 0)
    assert live.abort() is True and Client.aborts == ["y"]


# ---- the served context ----------------------------------------------------------------------------------
def test_the_served_context_is_capped_by_the_kv_cache_and_too_large_a_flag_is_refused(tiny_llama_dir):
    cfg = ModelConfig.from_pretrained(tiny_llama_dir)
    model = cfg.max_position_embeddings
    spec = WorkerSpec(str(tiny_llama_dir))
    assert served_context(spec, cfg, 4) == min(model, 64)  # 4 blocks of 16
    assert served_context(spec, cfg, 10_000) == model
    spec.max_model_len = 32
    assert served_context(spec, cfg, 4) == 32
    spec.max_model_len = 65
    assert model >= 65
    with pytest.raises(ConfigError) as info:
        served_context(spec, cfg, 4)
    assert info.value.field == "max-model-len" and "65" in info.value.message and "64" in info.value.message
    assert "--kv-cache-memory" in info.value.message


def test_the_planner_reports_a_cache_too_small_for_one_request_as_not_fitting():
    from cluster.planner.model_shape import ModelShape, load_config
    from cluster.planner.plan import Planner, Workload
    from tests.cluster.test_planner import LLAMA_70B, toy_cpu_profile

    model = ModelShape(load_config(str(LLAMA_70B)), "llama-3-70b")
    hw = toy_cpu_profile()
    hw.memory_bytes = 4 << 40
    planner = Planner(model, hw, "none", "float32", kv_cache_memory=64 << 20)
    work = Workload([(4000, 16)] * 4, concurrency=4)
    cand = planner.evaluate(1, 1, 4, work, {})
    assert not cand.fits and "one request of 4016 tokens" in cand.why and cand.ttft_ms_p50 is None


# ---- ports ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--port", "--http-port", "--metrics-port", "--health-port"])
def test_a_port_in_use_is_one_line_naming_the_flag(flag, capsys):
    from cluster.cli import main

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        free = {"--port": "0", "--http-port": "0", "--metrics-port": "0"}
        free[flag] = str(port)
        argv = ["serve", "--model", "/nonexistent"] + [a for k, v in free.items() for a in (k, v)]
        assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tpserve: error: {flag[2:]}: ") and str(port) in err[0]


def test_an_engine_abort_is_reported_as_abort_not_stop():
    """A truncated answer must not look complete: OpenAI's finish_reason is "abort" (as vLLM's)."""
    from cluster.frontend.openai_reply import Choice

    choice = Choice(0)
    choice.add(RequestOutput("x", finished=True, finish_reason="abort"))
    assert choice.finish_reason == "abort"
    choice.add(RequestOutput("x", finished=True, finish_reason="error"))
    assert choice.finish_reason == "stop"


def test_a_chat_template_that_refuses_the_messages_is_invalid_argument_naming_messages(tmp_path, smollm2_dir):
    import shutil

    from cluster.frontend.tokenize import PromptEncoder
    from cluster.frontend.validate import InvalidArgument

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, tmp_path / name)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                            "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                            "{{ m['content'] }}{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    enc = PromptEncoder(tmp_path)
    try:
        assert enc.encode_now(PromptInput("messages", messages=[("user", "a"), ("assistant", "b")]))
        with pytest.raises(InvalidArgument) as info:
            enc.encode_now(PromptInput("messages", messages=[("user", "a"), ("user", "b")]))
        assert info.value.field == "messages" and "alternate" in info.value.message
        with pytest.raises(InvalidArgument) as info:
            enc.check(PromptInput("messages", messages=[("user", "x\ud800")]))
        assert info.value.field == "messages[0].content"
    finally:
        enc.close()


def test_a_max_model_len_the_kv_cache_cannot_hold_is_refused_at_start(tiny_text_model, capsys):
    from cluster.cli import main

    assert main(["serve", "--model", str(tiny_text_model), "--kv-cache-memory", str(24 * 8192),
                 "--max-model-len", "512", "--port", "0", "--http-port", "0", "--metrics-port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tpserve: error: max-model-len: 512 tokens, but the KV cache "
                                                "holds 384 tokens"), err


def test_per_replica_series_are_read_at_each_scrape_and_go_with_their_replica():
    from prometheus_client import generate_latest

    client = EngineClient(_QueueInbox(), _EmptyOutbox(), is_alive=lambda: True, client_id="c")
    client.load = EngineLoad(free_blocks=30, num_blocks=40, waiting=2)
    router = Router(None, max_num_seqs=4, max_queue_len=0)
    router.add_replica(ReplicaHandle("rep-a", None, client, [], 1))
    metrics = Metrics()
    metrics.watch(router)
    text = generate_latest(metrics.registry).decode()
    assert 'tpserve_kv_cache_usage_ratio{replica="rep-a"} 0.25' in text
    assert "tpserve_requests_waiting 2.0" in text and "tpserve_replicas_ready 1.0" in text
    router.replicas.pop("rep-a")  # replaced: its series are gone from the next scrape
    assert 'replica="rep-a"' not in generate_latest(metrics.registry).decode()
    client.close()


@pytest.mark.parametrize(("exc", "grpc_name", "http"), [
    (ConfigError("top_k", "too big"), "INVALID_ARGUMENT", 400), (RequestFailed("r"), "INTERNAL", 500),
    (ReplicaLost("gone", failed=True), "UNAVAILABLE", 503), (ValueError("a bug"), None, None),
], ids=["config", "request_failed", "replica_lost", "bug"])
def test_one_table_gives_the_grpc_and_the_http_status(exc, grpc_name, http):
    from cluster.frontend.http_server import api_error
    from cluster.frontend.validate import InvalidArgument, NotFound
    from cluster.router import AlreadyExists, Overloaded, Unavailable

    got = status_of(exc)
    assert (got[0].name if got else None) == grpc_name
    err = api_error(exc)
    assert (err.status if err else None) == http
    if isinstance(exc, ConfigError):
        assert err.param == "top_k"
    for other, name, status in ((InvalidArgument("prompt", "empty"), "INVALID_ARGUMENT", 400),
                                (NotFound("m"), "NOT_FOUND", 404), (AlreadyExists("id"), "ALREADY_EXISTS", 409),
                                (Overloaded("full"), "RESOURCE_EXHAUSTED", 429), (Unavailable("none"), "UNAVAILABLE", 503)):
        assert status_of(other)[0].name == name and api_error(other).status == status

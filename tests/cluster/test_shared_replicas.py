"""Replicas in a joined Ray cluster: they outlive silent frontends, a slow load is not a stall, a
hung rank is still replaced, two frontends share replicas without taking each other's outputs,
and a reused request id is refused without leaking the router's counters.

One Ray cluster serves the module (a tiny random Llama over SmolLM2's tokenizer, so replicas load
in seconds); each test shuts its controller down, so the next starts clean.
"""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from cluster.api.tpserve.v1 import tpserve_pb2 as pb
from cluster.api.tpserve.v1 import tpserve_pb2_grpc as pb_grpc
from tests.cluster.conftest import ServeProcess
from tests.cluster.helpers import scrape, series, wait_replicas
from tests.ray_head import start_head
from tests.reliability import record

STALL_S = 2.0


@pytest.fixture(scope="module")
def gcs():
    cluster = start_head(num_cpus=6, include_dashboard=False, node_ip_address="127.0.0.1", object_store_memory=128 << 20)
    yield "127.0.0.1:" + cluster.address.rsplit(":", 1)[1]
    cluster.shutdown()


def test_replicas_outlive_silent_frontends_a_slow_load_is_no_stall_and_a_hung_rank_is_replaced(
        gcs, tiny_text_model):
    from tests.cluster.helpers import run_driver

    # The scenario runs in a child driver: a Ray driver in the pytest process (which also runs grpc
    # servers and clients) was seen to hang in ray.init's GCS connection.
    out = run_driver(gcs, f"""
        import os, signal
        from cluster.controller import ClusterConfig, get_or_create_controller
        from cluster.serve import ServeOptions, build_spec
        from workers.engine.core import EngineConfig

        STALL_S = {STALL_S}
        spec, _ = build_spec(ServeOptions(model={str(tiny_text_model)!r}, tp=2, kv_cache_memory=8 << 20))
        config = ClusterConfig("silent", spec, EngineConfig(), replicas=1, stall_timeout_s=STALL_S)
        t0 = time.monotonic()
        controller, created = get_or_create_controller(config, detached=True)  # no frontend, ever
        try:
            ready = ray.get(controller.wait_ready.remote(timeout_s=120), timeout=130)
            loaded_in = time.monotonic() - t0
            first = ray.get(controller.list_replicas.remote(), timeout=30)
            time.sleep(2 * STALL_S + 1)  # no frontend reports anything: the replica's own pings say "idle"
            restarts_idle = ray.get(controller.info.remote(), timeout=30)["restarts"]
            again = ray.get(controller.list_replicas.remote(), timeout=30)
            # A hung rank (SIGSTOP) is still found and the replica replaced.
            pid = next(w["pid"] for w in again[0]["workers"] if w["rank"] == 1)
            os.kill(pid, signal.SIGSTOP)
            stopped = time.monotonic()
            replaced = None
            try:
                while time.monotonic() - stopped < 60:
                    if ray.get(controller.info.remote(), timeout=30)["restarts"] >= 1:
                        replaced = time.monotonic() - stopped
                        break
                    time.sleep(0.2)
            finally:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            ready_again = ray.get(controller.wait_ready.remote(timeout_s=120), timeout=130)
            last = ray.get(controller.list_replicas.remote(), timeout=30)
        finally:
            ray.get(controller.shutdown.remote(), timeout=60)
            ray.kill(controller)
        print(json.dumps({{"created": created, "ready": ready, "loaded_in": loaded_in,
                          "first": [r["replica_id"] for r in first], "again": [r["replica_id"] for r in again],
                          "states": [r["state"] for r in again], "restarts_idle": restarts_idle,
                          "replaced_s": replaced, "ready_again": ready_again,
                          "last": [r["replica_id"] for r in last]}}))
    """, timeout_s=400)
    assert out["created"] and out["ready"]
    assert out["loaded_in"] > STALL_S, f"the load ({out['loaded_in']:.1f} s) must outlast the stall timeout"
    assert out["restarts_idle"] == 0 and out["again"] == out["first"] and out["states"] == ["ready"]
    assert out["replaced_s"] is not None, "a stopped rank was not replaced"
    assert out["ready_again"] and out["last"][0] != out["first"][0]
    record("silence", {"silent_s": 2 * STALL_S + 1, "stall_timeout_s": STALL_S, "load_s": round(out["loaded_in"], 1),
                       "restarts": out["restarts_idle"], "hung_replaced_s": round(out["replaced_s"], 1)})


# ---- two frontends, one replica set ------------------------------------------------------------------
PROMPTS = [[11 + i, 22, 33 + 2 * i, 44] for i in range(8)]
MAX_TOKENS = 60


def greedy(ids):
    return pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParameters(
        max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))


class Streams:
    def __init__(self, server, prompts):
        self.tokens = [[] for _ in prompts]
        self.errors: list = []
        self.threads = [threading.Thread(target=self._run, args=(server, i, p), daemon=True)
                        for i, p in enumerate(prompts)]
        for t in self.threads:
            t.start()

    def _run(self, server, i, ids):
        try:
            for m in pb_grpc.TpserveServiceStub(server.channel()).Generate(greedy(ids), timeout=120):
                self.tokens[i] += m.token_ids
        except grpc.RpcError as e:
            self.errors.append(e)

    def wait_tokens(self, n, timeout_s=60):
        deadline = time.monotonic() + timeout_s
        while min(len(t) for t in self.tokens) < n and not self.errors:
            assert time.monotonic() < deadline
            time.sleep(0.01)

    def join(self):
        for t in self.threads:
            t.join(150)
        assert not any(t.is_alive() for t in self.threads), "a stream hung"


@pytest.fixture(scope="module")
def two_frontends(gcs, tiny_text_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two-frontends")
    args = ["--model", str(tiny_text_model), "--tp", "2", "--replicas", "2", "--kv-cache-memory", str(8 << 20),
            "--ray-address", gcs, "--served-model-name", "shared", "--stall-timeout", str(STALL_S)]
    a = ServeProcess(args, tmp)
    wait_replicas(a, 2)
    b = ServeProcess(args, tmp)
    yield a, b
    for s in (a, b):
        if s.proc.poll() is None:
            s.terminate()
    from tests.cluster.helpers import run_driver

    run_driver(gcs, """
        try:
            c = ray.get_actor("controller:shared", namespace="tpserve")
            ray.get(c.shutdown.remote(), timeout=60)
            ray.kill(c)
        except ValueError:
            pass
        print("{}")
    """)


def index_blocks(server) -> list[float]:
    """The frontend's KV index size per replica (the gauge is set when cluster status is read)."""
    pb_grpc.TpserveServiceStub(server.channel()).GetClusterStatus(pb.GetClusterStatusRequest(), timeout=30)
    return sorted(series(server, "tpserve_routing_index_blocks"))


def test_two_frontends_index_the_same_cache_and_route_a_shared_prefix_to_it(two_frontends):
    a, b = two_frontends
    prefix = [(7 * i) % 240 + 3 for i in range(96)]  # 6 full blocks
    first = pb_grpc.TpserveServiceStub(a.channel()).Complete(pb.GenerateRequest(
        prompt_token_ids=pb.TokenIds(ids=prefix + [5, 6, 7, 8]),
        sampling=pb.SamplingParameters(max_tokens=4, temperature=0, ignore_eos=True)), timeout=60)
    assert first.cached_prompt_tokens == 0
    deadline = time.monotonic() + 10
    while (index_blocks(a) != index_blocks(b) or sum(index_blocks(a)) == 0) and time.monotonic() < deadline:
        time.sleep(1.1)  # the status (and so the gauge) is cached for 1 s
    on_a, on_b = index_blocks(a), index_blocks(b)
    assert on_a == on_b and on_a[0] == 0 and on_a[1] >= 6, (on_a, on_b)  # one replica holds it, in both views
    # b never saw that request, yet sends the same prefix to the replica that holds it.
    second = pb_grpc.TpserveServiceStub(b.channel()).Complete(pb.GenerateRequest(
        prompt_token_ids=pb.TokenIds(ids=prefix + [9, 10, 11]),
        sampling=pb.SamplingParameters(max_tokens=4, temperature=0, ignore_eos=True)), timeout=60)
    assert second.cached_prompt_tokens == 96
    assert series(b, "tpserve_routing_decisions_total") == [1.0]  # one decision, reason "cache"
    assert scrape(b)['tpserve_routing_decisions_total{reason="cache"}'] == 1.0


def test_two_frontends_share_replicas_and_one_dying_leaves_the_others_streams_whole(two_frontends):
    a, b = two_frontends
    alone = Streams(a, PROMPTS)
    alone.join()
    expected = alone.tokens
    assert not alone.errors and all(len(t) == MAX_TOKENS for t in expected)

    # 8 streams on each frontend at once, with status calls from both (engine calls with ids that
    # collided before each frontend had its own channel).
    on_a, on_b = Streams(a, PROMPTS), Streams(b, PROMPTS)
    for s in (a, b):
        st = pb_grpc.TpserveServiceStub(s.channel()).GetClusterStatus(pb.GetClusterStatusRequest(), timeout=30)
        assert len(st.replicas) == 2
    on_a.join()
    on_b.join()
    assert not on_a.errors and not on_b.errors, on_a.errors + on_b.errors
    assert on_a.tokens == expected and on_b.tokens == expected

    # One frontend dies mid-stream (SIGKILL: no goodbye); the other's streams finish untouched.
    on_a, on_b = Streams(a, PROMPTS), Streams(b, PROMPTS)
    on_a.wait_tokens(2)
    on_b.wait_tokens(2)
    a.kill()
    on_b.join()
    assert not on_b.errors and on_b.tokens == expected
    st = pb_grpc.TpserveServiceStub(b.channel()).GetClusterStatus(pb.GetClusterStatusRequest(), timeout=30)
    assert st.replica_restarts == 0 and len(st.replicas) == 2
    record("frontends", {"streams": 2 * len(PROMPTS), "survivor_streams": len(PROMPTS)})


def test_a_reused_request_id_is_refused_and_leaks_no_count_so_no_replica_restarts(two_frontends):
    _, b = two_frontends
    stub = pb_grpc.TpserveServiceStub(b.channel())
    before = stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=30)
    long = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[5, 6, 7]), request_id="client-42",
                              sampling=pb.SamplingParameters(max_tokens=200, temperature=0, ignore_eos=True))
    first = stub.Generate(long, timeout=60)
    next(iter(first))  # in flight
    with pytest.raises(grpc.RpcError) as dup:
        stub.Complete(long, timeout=30)
    assert dup.value.code() == grpc.StatusCode.ALREADY_EXISTS and "request_id" in dup.value.details()
    assert sum(len(m.token_ids) for m in first) == 199  # the first one was not disturbed
    # A client retrying with its own id after the first finished is served.
    again = stub.Complete(long, timeout=60)
    assert again.completion_tokens == 200
    time.sleep(2 * STALL_S + 1)
    after = stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=30)
    assert after.requests_in_flight == 0 and after.replica_restarts == before.replica_restarts
    assert {r.replica_id for r in after.replicas} == {r.replica_id for r in before.replicas}
    assert series(b, "tpserve_replica_requests_in_flight") == [0.0, 0.0]
    assert series(b, "tpserve_replica_load_tokens") == [0.0, 0.0]

"""Start, readiness, shutdown, and a frontend joined to an existing (multi-node) Ray cluster.

These use a tiny random Llama over SmolLM2's tokenizer, so replicas load in a second.
"""
from __future__ import annotations

import threading
import time

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.api.tpserve.v1 import tpserve_pb2 as pb
from cluster.api.tpserve.v1 import tpserve_pb2_grpc as pb_grpc
from tests.cluster.conftest import ServeProcess
from tests.ray_head import start_head


def check(target: str, service: str = "") -> int | None:
    try:
        with grpc.insecure_channel(target) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                        timeout=1).status
    except grpc.RpcError:
        return None


def test_health_turns_serving_only_after_replicas_load_and_sigterm_leaves_nothing(tmp_path, tiny_text_model):
    server = ServeProcess(["--model", str(tiny_text_model), "--tp", "2", "--replicas", "1", "--kv-cache-memory",
                           str(8 << 20), "--drain-timeout", "20"], tmp_path, wait=False)
    seen: list[int | None] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(check(server.target))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    server.wait_ready()
    time.sleep(0.3)
    stop.set()
    watcher.join()
    statuses = [s for s in seen if s is not None]
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses  # answered while replicas loaded
    assert statuses[-1] == health_pb2.HealthCheckResponse.SERVING
    first_serving = statuses.index(health_pb2.HealthCheckResponse.SERVING)
    assert all(s == health_pb2.HealthCheckResponse.SERVING for s in statuses[first_serving:])
    assert check(server.target, "liveness") == health_pb2.HealthCheckResponse.SERVING

    # SIGTERM drains: health turns NOT_SERVING and new requests get UNAVAILABLE at once, while a
    # stream in flight finishes; then nothing is left behind.
    family = [server.proc.pid] + [p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)]
    assert len(family) > 3  # Ray's processes and the two rank actors
    stub = pb_grpc.TpserveServiceStub(server.channel())
    call = stub.Generate(pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParameters(
        max_tokens=480, temperature=0, ignore_eos=True)), timeout=60)
    it = iter(call)
    next(it)
    server.proc.send_signal(15)
    deadline = time.monotonic() + 5
    while check(server.target) != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "health did not turn NOT_SERVING on SIGTERM"
        time.sleep(0.02)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Complete(pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingParameters(max_tokens=2)), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in refused.value.details()
    import httpx  # the HTTP API drains the same way

    assert httpx.get(server.http + "/health", timeout=10).status_code == 503
    model = httpx.get(server.http + "/v1/models", timeout=10).json()["data"][0]["id"]
    r = httpx.post(server.http + "/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2},
                   timeout=10)
    assert r.status_code == 503 and "draining" in r.json()["error"]["message"]
    rest, code = list(it), grpc.StatusCode.OK
    assert rest and rest[-1].finish_reason == pb.FINISH_REASON_LENGTH and rest[-1].completion_tokens == 480
    assert server.proc.wait(90) == 0
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in family):
        assert time.monotonic() < deadline, [p for p in family if psutil.pid_exists(p)]
        time.sleep(0.5)
    server.kill()
    assert code == grpc.StatusCode.OK


@pytest.fixture
def ray_cluster():
    loopback = {"node_ip_address": "127.0.0.1", "object_store_memory": 128 << 20}
    # The GCS declares a node dead after it misses health checks: 5 x 3 s by default, here 5 x 1 s,
    # so a removed node's actors are reported dead seconds sooner (the node test waits on that).
    fast_node_death = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
    cluster = start_head(num_cpus=4, include_dashboard=False, _system_config=fast_node_death, **loopback)
    cluster.add_node(num_cpus=4, **loopback)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def test_replicas_spread_over_nodes_and_survive_a_joined_frontend(tmp_path, tiny_text_model, ray_cluster):
    gcs = "127.0.0.1:" + ray_cluster.address.rsplit(":", 1)[1]  # .address names the host's other interface
    args = ["--model", str(tiny_text_model), "--tp", "2", "--replicas", "2", "--kv-cache-memory", str(8 << 20),
            "--ray-address", gcs, "--served-model-name", "tiny", "--expose-topology"]
    first = ServeProcess(args, tmp_path)
    try:
        stub = pb_grpc.TpserveServiceStub(first.channel())
        deadline = time.monotonic() + 120
        while len((st := stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=30)).replicas) < 2:
            assert time.monotonic() < deadline, st
            time.sleep(0.3)
        nodes = []
        for r in st.replicas:
            assert len(r.workers) == 2 and len({w.node_id for w in r.workers}) == 1  # ranks share a node
            assert all(w.node_ip == "127.0.0.1" for w in r.workers)
            nodes.append(r.workers[0].node_id)
        assert len(set(nodes)) == 2  # each node had room for both; tpserve spread them
        ids = {r.replica_id for r in st.replicas}
    finally:
        assert first.terminate() == 0
    second = ServeProcess(args, tmp_path)
    try:
        stub = pb_grpc.TpserveServiceStub(second.channel())
        st = stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=30)
        assert {r.replica_id for r in st.replicas} == ids  # found the running replicas, started none
        out = stub.Complete(pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingParameters(max_tokens=3)), timeout=60)
        assert out.completion_tokens == 3
    finally:
        assert second.terminate() == 0
    from tests.cluster.helpers import run_driver

    out = run_driver(gcs, """
        c = ray.get_actor("controller:tiny", namespace="tpserve")
        before = len(ray.get(c.list_replicas.remote(), timeout=30))  # still running after both frontends left
        ray.get(c.scale.remote(1), timeout=60)  # scale at run time
        deadline = time.monotonic() + 60
        while len(ray.get(c.list_replicas.remote(), timeout=30)) != 1 and time.monotonic() < deadline:
            time.sleep(0.3)
        after = len(ray.get(c.list_replicas.remote(), timeout=30))
        ray.get(c.shutdown.remote(), timeout=60)
        ray.kill(c)
        print(json.dumps({"before": before, "after": after}))
    """)
    assert out == {"before": 2, "after": 1}


def test_a_node_that_goes_away_loses_no_request_and_its_replica_is_replaced(
        tmp_path, tiny_text_model, ray_cluster):
    """Two nodes, one replica each; the second node disappears (its raylet and every process on it
    killed) while streams run on both: every stream finishes with the tokens of a fault-free run,
    and the replacement replica starts where there is room (the surviving node has it)."""
    from tests.cluster.helpers import wait_replicas
    from tests.reliability import record

    gcs = "127.0.0.1:" + ray_cluster.address.rsplit(":", 1)[1]
    server = ServeProcess(["--model", str(tiny_text_model), "--tp", "2", "--replicas", "2", "--kv-cache-memory",
                           str(8 << 20), "--ray-address", gcs, "--served-model-name", "tiny", "--expose-topology"],
                          tmp_path)
    stub = pb_grpc.TpserveServiceStub(server.channel())
    request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[11, 22, 33, 44]),
                                 sampling=pb.SamplingParameters(max_tokens=200, temperature=0, ignore_eos=True))
    try:
        st = wait_replicas(server, 2)
        doomed = ray_cluster.list_all_nodes()[1]
        assert {r.workers[0].node_id for r in st.replicas} == {n.node_id for n in ray_cluster.list_all_nodes()}
        expected = [list(m.token_ids) for m in stub.Generate(request, timeout=120)]
        expected = [t for chunk in expected for t in chunk]
        results: list[list[int] | Exception] = [[] for _ in range(4)]

        def run(i):
            try:
                for m in stub.Generate(request, timeout=120):
                    results[i] += m.token_ids
            except grpc.RpcError as e:
                results[i] = e

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        while min(len(r) if isinstance(r, list) else 0 for r in results) < 2:
            time.sleep(0.01)
        ray_cluster.remove_node(doomed, allow_graceful=False)
        for t in threads:
            t.join(120)
        assert all(r == expected for r in results), [r if isinstance(r, Exception) else len(r) for r in results]
        resumed = stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=30).requests_resumed
        assert resumed >= 1
        after = wait_replicas(server, 2)
        assert [r.state for r in after.replicas] == [pb.REPLICA_STATE_READY] * 2 and after.replica_restarts == 1
        assert doomed.node_id not in {w.node_id for r in after.replicas for w in r.workers}
        record("node", {"fault": "node with one of 2 replicas removed", "streams": 4, "resumed": resumed, "lost": 0})
    finally:
        server.terminate()
        from tests.cluster.helpers import run_driver

        run_driver(gcs, """
            ray.get(ray.get_actor("controller:tiny", namespace="tpserve").shutdown.remote(), timeout=60)
            print("{}")
        """)

"""The policies other than the default still honour admission, resume and drain (the shared
cluster's tests cover kv-aware, the default): one server per policy, a tiny random Llama over
SmolLM2's tokenizer, two replicas at tp 1."""
from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest

from cluster.api.tpserve.v1 import tpserve_pb2 as pb
from cluster.api.tpserve.v1 import tpserve_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2

from tests.cluster.conftest import ServeProcess
from tests.cluster.helpers import wait_replicas
from tests.cluster.test_lifecycle import check

MAX_TOKENS = 100  # streams last long enough to be interrupted (the tiny model holds 512)


def request(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[10 + i, 20, 30 + i]), sampling=pb.SamplingParameters(
        max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))


class Streams:
    def __init__(self, server, n: int):
        self.tokens = [[] for _ in range(n)]
        self.codes: list = [None] * n
        self.first = [threading.Event() for _ in range(n)]
        self.threads = [threading.Thread(target=self._run, args=(server, i), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, server, i):
        try:
            for m in pb_grpc.TpserveServiceStub(server.channel()).Generate(request(i), timeout=120):
                self.tokens[i] += m.token_ids
                self.first[i].set()
            self.codes[i] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            self.codes[i] = e.code()
        finally:
            self.first[i].set()

    def join(self):
        for t in self.threads:
            t.join(150)
        assert not any(t.is_alive() for t in self.threads), "a stream hung"


@pytest.mark.parametrize("policy", ["least-load", "round-robin"])
def test_a_policy_keeps_admission_resume_and_drain(policy, tmp_path, tiny_text_model):
    server = ServeProcess(["--model", str(tiny_text_model), "--tp", "1", "--replicas", "2", "--routing", policy,
                           "--max-num-seqs", "2", "--max-queue-len", "2", "--kv-cache-memory", str(4 << 20),
                           "--expose-topology", "--drain-timeout", "30", "--ray-num-cpus", "4"], tmp_path)
    try:
        wait_replicas(server, 2)  # ready is announced at the first replica
        stub = pb_grpc.TpserveServiceStub(server.channel())
        # Admission: 2 replicas x 2 sequences + 2 queued = 6; of 12 at once the rest are refused.
        flood = Streams(server, 12)
        flood.join()
        ok = [i for i, c in enumerate(flood.codes) if c == grpc.StatusCode.OK]
        refused = [c for c in flood.codes if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(ok) + len(refused) == 12 and refused and len(ok) >= 6, flood.codes
        assert all(len(flood.tokens[i]) == MAX_TOKENS for i in ok)

        # Resume: a replica's rank dies under 4 streams; every stream still gets all its tokens.
        st = stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=30)
        assert {r.requests_routed > 0 for r in st.replicas} == {True}  # both replicas took work
        streams = Streams(server, 4)
        for e in streams.first:
            e.wait(60)
        victim = st.replicas[0].workers[0].pid
        os.kill(victim, signal.SIGKILL)
        streams.join()
        assert streams.codes == [grpc.StatusCode.OK] * 4 and all(len(t) == MAX_TOKENS for t in streams.tokens)
        after = stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=30)
        assert after.requests_resumed >= 1

        # Drain: SIGTERM lets the stream in flight finish and refuses what comes after.
        last = Streams(server, 1)
        last.first[0].wait(60)
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while check(server.target) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health did not turn NOT_SERVING on SIGTERM"
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as late:
            stub.Complete(request(99), timeout=10)
        assert late.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in late.value.details()
        last.join()
        assert last.codes == [grpc.StatusCode.OK] and len(last.tokens[0]) == MAX_TOKENS
        assert server.proc.wait(60) == 0
    finally:
        server.kill()

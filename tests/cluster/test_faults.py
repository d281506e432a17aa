"""Faults on the shared cluster (SmolLM2, tp 2 x 2 replicas): a killed worker and a stopped
(SIGSTOP) worker lose no request. Each test waits for the replica count to heal before it ends,
so the tests after it find the cluster whole."""
from __future__ import annotations

import os
import signal
import threading
import time

import psutil

from cluster.api.tpserve.v1 import tpserve_pb2 as pb
from tests.cluster.helpers import status, stub, wait_blocks_free, wait_replicas
from tests.reliability import record

PROMPTS = [f"{topic} is" for topic in ("The capital of France", "A good breakfast", "The tallest mountain",
                                       "Python", "The ocean", "A tensor", "Music", "The moon")]
MAX_TOKENS = 40


def request(prompt: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParameters(
        max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))


class Streams:
    """Greedy Generate streams on threads, recording every token as it arrives."""

    def __init__(self, cluster, prompts):
        self.tokens = [[] for _ in prompts]
        self.finish = [None] * len(prompts)
        self.errors = []
        self.threads = [threading.Thread(target=self._run, args=(cluster, i, p), daemon=True)
                        for i, p in enumerate(prompts)]
        for t in self.threads:
            t.start()

    def _run(self, cluster, i, prompt):
        try:
            for msg in stub(cluster).Generate(request(prompt), timeout=240):
                self.tokens[i] += msg.token_ids
                if msg.finish_reason:
                    self.finish[i] = msg.finish_reason
        except Exception as e:  # a lost request: the test reports it
            self.errors.append(e)

    def wait_tokens(self, n: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while min(len(t) for t in self.tokens) < n:
            assert time.monotonic() < deadline and not self.errors, (self.errors, [len(t) for t in self.tokens])
            time.sleep(0.02)

    def join(self) -> None:
        for t in self.threads:
            t.join(240)


def fault_free_tokens(cluster):
    streams = Streams(cluster, PROMPTS)
    streams.join()
    assert not streams.errors and all(len(t) == MAX_TOKENS for t in streams.tokens)
    return streams.tokens


def victim(cluster, rank: int) -> tuple[str, int]:
    rep = sorted(status(cluster).replicas, key=lambda r: r.replica_id)[0]
    return rep.replica_id, next(w.pid for w in rep.workers if w.rank == rank)


def streams_before_a_fault(cluster):
    """The fault-free tokens, the status before, a victim (rank 1 of the first replica), and 8
    streams that have all received tokens: so at least two of the victim's (it holds half) have."""
    expected = fault_free_tokens(cluster)
    before = status(cluster)
    replica_id, pid = victim(cluster, rank=1)
    streams = Streams(cluster, PROMPTS)
    streams.wait_tokens(2)
    return expected, before, replica_id, pid, streams


def test_killed_worker_of_one_replica_loses_no_token_and_the_replica_returns(cluster):
    expected, before, replica_id, pid, streams = streams_before_a_fault(cluster)
    mid = [len(t) for t in streams.tokens]
    os.kill(pid, signal.SIGKILL)
    streams.join()
    after = wait_replicas(cluster, 2)
    assert not streams.errors, streams.errors
    assert streams.tokens == expected  # no duplicate, no missing, no different token
    assert all(f == pb.FINISH_REASON_LENGTH for f in streams.finish)
    resumed = after.requests_resumed - before.requests_resumed
    assert resumed >= 2, (resumed, mid)
    assert replica_id not in {r.replica_id for r in after.replicas}
    assert [r.state for r in after.replicas] == [pb.REPLICA_STATE_READY] * 2
    assert after.replica_restarts == before.replica_restarts + 1
    assert wait_blocks_free(cluster).requests_in_flight == 0
    record("fault", {"fault": "SIGKILL of rank 1 of one of 2 replicas", "streams": len(PROMPTS),
                     "resumed": resumed, "lost": 0, "tokens_equal_fault_free": True,
                     "replicas_after": len(after.replicas)})


def test_stopped_worker_is_detected_and_its_requests_resume_within_the_bound(cluster):
    expected, before, replica_id, pid, streams = streams_before_a_fault(cluster)
    try:
        os.kill(pid, signal.SIGSTOP)  # a hang: the process lives but its collectives never complete
        stopped_at = time.monotonic()
        while replica_id in {r.replica_id for r in status(cluster).replicas}:
            assert time.monotonic() - stopped_at < 15, "the stopped replica was not taken out within 15 s"
            time.sleep(0.1)
        detected_s = time.monotonic() - stopped_at
        streams.join()
        finished_s = time.monotonic() - stopped_at
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGCONT)
    after = wait_replicas(cluster, 2)
    assert not streams.errors, streams.errors
    assert streams.tokens == expected
    # health period (1 s) + ping timeout (3 s) + the frontend's refresh (0.5 s), with slack for 2 cores
    assert detected_s < 10, detected_s
    assert after.requests_resumed - before.requests_resumed >= 1
    assert after.replica_restarts == before.replica_restarts + 1
    record("hang", {"fault": "SIGSTOP of rank 1 of one of 2 replicas", "streams": len(PROMPTS),
                    "resumed": after.requests_resumed - before.requests_resumed, "lost": 0,
                    "detected_s": round(detected_s, 2), "all_finished_s": round(finished_s, 2),
                    "tokens_equal_fault_free": True})


def test_with_no_replica_to_resume_on_the_client_gets_unavailable_after_the_resume_timeout(tmp_path_factory,
                                                                                          tiny_text_model):
    """One replica, --resume-timeout 0.5 s: when its rank 0 dies (the actor the frontend talks to:
    the "actor lost" path), its requests wait that long for a ready replica (a replacement takes
    seconds), then end UNAVAILABLE; then the replica returns."""
    import grpc
    import pytest

    from tests.cluster.conftest import ServeProcess

    server = ServeProcess(["--model", str(tiny_text_model), "--served-model-name", "tiny", "--tp", "2",
                           "--kv-cache-memory", str(8 << 20), "--resume-timeout", "0.5", "--ray-num-cpus", "3",
                           "--expose-topology"],
                          tmp_path_factory.mktemp("resume-timeout"))
    try:
        _, pid = victim(server, rank=0)
        call = stub(server).Generate(pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParameters(
            max_tokens=480, temperature=0, ignore_eos=True)), timeout=60)
        it = iter(call)
        next(it)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            for _ in it:
                pass
        waited = time.monotonic() - killed
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        assert "resume" in info.value.details()
        assert 0.5 <= waited < 5, waited
        deadline = time.monotonic() + 120  # (the status is cached for a second: it may predate the kill)
        while (after := wait_replicas(server, 1)).replica_restarts != 1:
            assert time.monotonic() < deadline, after
            time.sleep(0.5)
        assert after.replicas[0].state == pb.REPLICA_STATE_READY
        assert stub(server).Complete(pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingParameters(max_tokens=3)),
                                     timeout=60).completion_tokens == 3
    finally:
        server.terminate()

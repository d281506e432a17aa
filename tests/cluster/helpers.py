"""Client-side helpers the cluster tests share."""
from __future__ import annotations

import time
import urllib.request

from cluster.api.tpserve.v1 import tpserve_pb2 as pb
from cluster.api.tpserve.v1 import tpserve_pb2_grpc as pb_grpc

PROMPT = "The capital of France is"


def stub(cluster):
    return pb_grpc.TpserveServiceStub(cluster.channel())


def greedy_request(prompt=PROMPT, n=12, **kw):
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParameters(max_tokens=n, temperature=0, **kw))


def status(cluster) -> pb.ClusterStatus:
    return stub(cluster).GetClusterStatus(pb.GetClusterStatusRequest(), timeout=30)


def scrape(server) -> dict[str, float]:
    """Every series of the frontend's /metrics, keyed as Prometheus prints it (`name{labels}`)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def series(server, name: str) -> list[float]:
    """The values of metric `name`, one per label set."""
    return [v for k, v in scrape(server).items() if k == name or k.startswith(name + "{")]


def wait_blocks_free(cluster, timeout_s=20) -> pb.ClusterStatus:
    """The cluster status once every replica is idle with every KV block free (or at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = status(cluster)
        if all(r.kv_blocks_free == r.kv_blocks_total and r.running == 0 and r.waiting == 0 for r in st.replicas):
            return st
        if time.monotonic() > deadline:
            return st
        time.sleep(0.2)


def wait_replicas(cluster, n: int, timeout_s: float = 180) -> pb.ClusterStatus:
    """The cluster status once exactly n replicas are ready (or at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = status(cluster)
        ready = [r for r in st.replicas if r.state == pb.REPLICA_STATE_READY]
        if len(ready) == n == len(st.replicas) or time.monotonic() > deadline:
            return st
        time.sleep(0.5)


def run_driver(gcs: str, body: str, timeout_s: float = 180) -> dict:
    """Run `body` as a Ray driver of the cluster at `gcs` in a child process and return the JSON
    it prints last. A child, not this process: a driver in the pytest process (which also runs
    grpc clients and servers) was seen to hang in ray.init's GCS connection."""
    import json
    import subprocess
    import sys
    import textwrap

    code = ("import json, time, ray\n"
            f"ray.init(address={gcs!r}, namespace='tpserve', log_to_driver=False)\n"
            "try:\n" + textwrap.indent(textwrap.dedent(body), "    ") + "\nfinally:\n    ray.shutdown()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

"""One running cluster per test session: `tpserve serve` in a subprocess (its own embedded Ray),
SmolLM2 at tp 2 with two replicas, talked to over loopback gRPC."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from tests.models import make_tiny_llama_with_tokenizer
from workers import OPENMP_ENV

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`tpserve serve ...` as a child process in its own process group (so no Ray process is lost)."""

    def __init__(self, args: list[str], tmp: Path, timeout_s: float = 240, wait: bool = True,
                 env: dict[str, str] | None = None):
        self.args, self.tmp, self.attempts, self.extra_env = args, tmp, 0, dict(env or {})
        self._start()
        if wait:
            self.wait_ready(timeout_s)

    def _start(self) -> None:
        # Ports are picked free here and bound by the child a moment later: another process (a Ray
        # worker) may take one in between, so a bind failure is retried with new ports.
        self.attempts += 1
        self.port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        self.ready_file = self.tmp / f"ready-{self.port}"
        self.log_path = self.tmp / f"serve-{self.port}.log"
        self.log = open(self.log_path, "w")
        env = {**os.environ, **OPENMP_ENV, "PYTHONUNBUFFERED": "1", **self.extra_env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--metrics-port", str(self.metrics_port), "--http-port", str(self.http_port),
             "--ready-file", str(self.ready_file), *self.args],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.target = f"127.0.0.1:{self.port}"
        self.http = f"http://127.0.0.1:{self.http_port}"

    def wait_ready(self, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready_file.exists():
            if self.proc.poll() is not None and self.attempts < 3 and any(s in self.log_path.read_text() for s in ("Failed to bind", "cannot listen on")):
                self.kill()
                self._start()
                continue
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"tpserve serve did not become ready:\n{self.log_path.read_text()[-4000:]}")
            time.sleep(0.2)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def terminate(self, timeout_s: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.kill()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory, smollm2_dir):
    return make_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny-text"), smollm2_dir)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, smollm2_dir):
    tmp = tmp_path_factory.mktemp("cluster")
    server = ServeProcess(["--model", "smollm2-135m", "--tp", "2", "--replicas", "2", "--kv-cache-memory",
                           str(48 << 20), "--max-num-seqs", "8", "--max-queue-len", "8", "--max-model-len", "1024",
                           "--ray-num-cpus", "6", "--expose-topology",
                           "--enable-auto-tool-choice", "--tool-call-parser", "hermes"], tmp)
    from tests.cluster.helpers import wait_replicas

    wait_replicas(server, 2)  # ready is announced at the first replica; the tests want both
    yield server
    server.terminate()

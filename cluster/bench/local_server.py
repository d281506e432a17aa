"""`tpserve serve` as a child process (the benchmarks, `tpserve profile`): free loopback ports, wait for ready,
SIGTERM (drain) at the end. One helper, so every caller starts its server the same way."""
from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True, slots=True)
class Served:
    target: str  # host:port of the gRPC APIs
    http_target: str  # host:port of the OpenAI-compatible HTTP API


@contextlib.contextmanager
def running_server(*args: str):
    """`tpserve serve ARGS` (plus its ports and --metrics-port 0); yields a Served once ready."""
    port, http = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready"
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--port", str(port), "--http-port",
                                 str(http), "--metrics-port", "0", "--ready-file", str(ready), *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            while not ready.exists():
                if proc.poll() is not None:
                    raise SystemExit("tpserve serve exited during start-up")
                time.sleep(0.2)
            yield Served(f"127.0.0.1:{port}", f"127.0.0.1:{http}")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)

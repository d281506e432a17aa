"""Frontend RSS while it parses large HTTP bodies: a high-water mark or a leak?

Starts a one-replica server over a tiny random model (SmolLM2's tokenizer), posts the event-loop
test's 13.7 MiB body (3.6 M numbers in an ignored field) in rounds of 8, and prints the frontend's
RSS after each round. Flat after the first round: a high-water mark.

    .venv/bin/python scripts/http_body_rss.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(rounds: int = 6) -> int:
    import httpx
    import psutil

    from tests.cluster.conftest import ServeProcess
    from tests.models import make_tiny_llama_with_tokenizer
    from workers.model_source import resolve_model

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_llama_with_tokenizer(Path(tmp) / "tiny", resolve_model("smollm2-135m"))
        server = ServeProcess(["--model", str(model), "--served-model-name", "tiny", "--kv-cache-memory",
                               str(4 << 20)], Path(tmp))
        try:
            frontend = psutil.Process(server.proc.pid)
            body = ('{"model": "tiny", "prompt": "Hello", "max_tokens": 1, "padding": ['
                    + ",".join(["0.5"] * 3_600_000) + "]}").encode()
            print(f"body {len(body) / 2**20:.1f} MiB; frontend RSS at start {frontend.memory_info().rss / 2**20:.1f} MB")
            with httpx.Client(base_url=server.http, timeout=120) as h:
                for r in range(rounds):
                    for _ in range(8):
                        status = h.post("/v1/completions", content=body,
                                        headers={"content-type": "application/json"}).status_code
                        assert status == 200, status
                    print(f"after {8 * (r + 1)} bodies: {frontend.memory_info().rss / 2**20:.1f} MB", flush=True)
        finally:
            server.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())

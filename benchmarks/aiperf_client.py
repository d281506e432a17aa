"""NVIDIA's aiperf, a load generator others use, run against our OpenAI API on given requests.

aiperf lives in the benchmark-only venv (`make bench-clients` installs it in .venv-clients; never
in `make test`) and is run as its users run it: `aiperf profile`, streaming completions, a local
tokenizer, the requests from a single-turn JSONL file (aiperf's `custom` dataset: text and
output length per line), sent in file order at a fixed concurrency. Its figures come from the
profile_export_aiperf.json it writes.

On a 2-core machine shared with the server, aiperf measures the client as much as the server: its
timing manager waits for a free concurrency slot by yielding in a loop (`yield_to_event_loop` in
timing/strategies/request_rate.py), 77-86% of a core for the whole run (`ps`), beside its workers,
record processor and controller processes, while the engine's Ray rank actors run at nice 15
(Ray's worker niceness). See docs/benchmarks.md for the figures; the comparison is meant for a
client on its own machine.
"""
from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from cluster.bench.workload import BenchRequest

DEFAULT_BIN = Path(__file__).resolve().parents[1] / ".venv-clients" / "bin" / "aiperf"


class AiperfError(RuntimeError):
    """aiperf exited non-zero, wrote no figures, or reported failed requests."""


def version(binary: Path = DEFAULT_BIN) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=120)
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else "?"


def run_aiperf(http_target: str, model: str, tokenizer: str, requests: list[BenchRequest], concurrency: int,
               binary: Path = DEFAULT_BIN, cache_salt: str | None = None, timeout_s: float = 1800) -> dict:
    """Sends `requests` (text prompts; greedy, `ignore_eos` so each output has its asked length)
    and returns {"output_tok_s", "ttft_p50_ms", "itl_p50_ms", "requests", "output_len_mean"} from
    aiperf's export (the last: its own count of output tokens, to check the asked lengths arrived)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "requests.jsonl"
        data.write_text("".join(json.dumps({"text": r.prompt_text, "output_length": r.output_len}) + "\n"
                                for r in requests))
        extra = ["ignore_eos:true", "temperature:0"] + ([f"cache_salt:{cache_salt}"] if cache_salt else [])
        cmd = [str(binary), "profile", "--model", model, "--url", f"http://{http_target}",
               "--endpoint-type", "completions", "--streaming", "--tokenizer", tokenizer,
               "--input-file", str(data), "--custom-dataset-type", "single_turn",
               "--dataset-sampling-strategy", "sequential", "--request-count", str(len(requests)),
               "--concurrency", str(concurrency),
               "--artifact-dir", str(Path(tmp) / "out"), "--ui-type", "none",
               "--no-server-metrics", "--no-gpu-telemetry"]
        for e in extra:
            cmd += ["--extra-inputs", e]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        found = list((Path(tmp) / "out").rglob("profile_export_aiperf.json"))
        if done.returncode != 0 or not found:
            tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
            raise AiperfError(f"aiperf exited {done.returncode}:\n" + "\n".join(tail))
        report = json.loads(found[0].read_text())
    metrics = report.get("records", report)  # the metric tags sit at the top level or under "records"

    def figure(tag: str, stat: str) -> float:
        m = metrics.get(tag)
        if not isinstance(m, dict) or m.get(stat) is None:
            raise AiperfError(f"aiperf's export has no {tag}.{stat}: {sorted(metrics)[:20]}")
        return float(m[stat])

    errors = metrics.get("error_request_count")
    if isinstance(errors, dict) and errors.get("avg"):
        raise AiperfError(f"aiperf: {errors['avg']:.0f} requests failed")
    return {"output_tok_s": figure("output_token_throughput", "avg"),
            "ttft_p50_ms": figure("time_to_first_token", "p50"),
            "itl_p50_ms": figure("inter_token_latency", "p50"),
            "requests": figure("request_count", "avg"),
            "output_len_mean": figure("output_sequence_length", "avg")}

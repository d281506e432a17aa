"""`tpserve bench` against the real cluster (SmolLM2): a short sweep writes the JSON and a real PNG."""
import json
import subprocess
import sys

import numpy as np
from PIL import Image


def test_sweep_writes_report_and_a_frontier_picture(cluster, tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "--target", cluster.target, "--sweep", "1,4",
                           "--num-requests", "4", "--warmup", "1", "--input-range", "8,32", "--output-range", "4,8",
                           "--out", str(out), "--plot", str(png), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert [r["load_label"] for r in report["runs"]] == ["conc 1", "conc 4"]
    for run in report["runs"]:
        s = run["summary"]
        assert s["completed"] == 4 and s["failed"] == 0
        assert s["output_tokens"] == sum(r["output_tokens"] for r in run["records"])
        assert s["tpot"]["median_ms"] > 0 and s["output_token_throughput"] > 0
    assert report["server"]["model_info"]["name"] == "smollm2-135m"
    assert len(report["server"]["cluster_status"]["replicas"]) == 2
    assert report["harness_version"] and report["harness_overhead_ms_per_chunk"] > 0

    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    h, w, _ = img.shape
    assert w >= 800 and h >= 250
    frontier = img[:, 2 * w // 3:]
    # matplotlib's first line colour (#1f77b4) marks the frontier's points and line
    blue = (abs(frontier[..., 0] - 0x1F) < 30) & (abs(frontier[..., 1] - 0x77) < 30) & (abs(frontier[..., 2] - 0xB4) < 30)
    assert blue.sum() > 50
    dark = (frontier.sum(-1) < 150).sum()  # axes, ticks and labels
    assert dark > 500


def test_compare_prints_figure_by_figure(cluster, tmp_path):
    paths = []
    for i in range(2):
        p = tmp_path / f"{i}.json"
        subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "--target", cluster.target, "--concurrency", "2",
                        "--num-requests", "2", "--warmup", "0", "--input-range", "8,16", "--output-range", "3,4",
                        "--out", str(p), "--no-progress"], check=True, capture_output=True, timeout=300)
        paths.append(str(p))
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "compare", *paths], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    assert "output_token_throughput" in proc.stdout and "ttft.median_ms" in proc.stdout


def test_openai_protocol_load_tests_an_http_server_with_no_grpc_beside_it(cluster, tmp_path):
    """--protocol openai --tokenizer: the target is the HTTP address alone (as for vLLM or SGLang);
    the model's name and vocabulary come from the flags, and every request is counted."""
    http = f"127.0.0.1:{cluster.http_port}"
    out = tmp_path / "openai.json"
    base = [sys.executable, "-m", "cluster.cli", "bench", "--protocol", "openai", "--target", http,
            "--tokenizer", "smollm2-135m", "--concurrency", "2", "--num-requests", "3", "--warmup", "1",
            "--input-range", "8,16", "--output-range", "3,5", "--no-progress"]
    proc = subprocess.run(base + ["--model", "smollm2-135m", "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    s = report["runs"][0]["summary"]
    assert s["completed"] == 3 and s["failed"] == 0
    assert report["http_target"] == http and [m["id"] for m in report["server"]["models"]["data"]] == ["smollm2-135m"]
    # Exact lengths as asked: every request's output tokens came back through the usage chunk.
    assert all(3 <= r["output_tokens"] <= 5 for r in report["runs"][0]["records"])

    for extra, flag in ((["--model", "nope"], "--model"), ([], "--model")):
        bad = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and flag in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    bad = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "--target", cluster.target, "--tokenizer",
                          "smollm2-135m", "--num-requests", "1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--tokenizer" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr

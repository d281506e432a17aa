"""`tpserve generate --prompts-file/--out`: every line runs concurrently, results in input order."""
import json
import subprocess
import sys


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "cluster.cli", "generate", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_prompts_file_results_in_input_order(tmp_path, smollm2_dir, smollm2_reference):
    model, tok = smollm2_reference
    lines = [{"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0},
             {"prompt": "1, 2, 3,", "max_tokens": 8, "temperature": 0, "stop": [" 5"]},
             {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0.8, "seed": 1}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines))
    proc = run_cli("--model", str(smollm2_dir), "--tp", "2", "--prompts-file", str(src), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(results) == 3
    assert results[0]["text"].startswith(" Paris") and results[0]["finish_reason"] == "length"
    assert results[0]["prompt_tokens"] == len(tok(lines[0]["prompt"]).input_ids)
    assert results[1]["finish_reason"] == "stop" and results[1]["text"] == " 4,"
    assert len(results[2]["token_ids"]) == 5


def test_bad_line_names_line_and_field(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt": "ok"}\n{"prompt": "x", "temperature": -2}\n')
    proc = run_cli("--prompts-file", str(src))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"tpserve: error: {src}:2: temperature: must be >= 0, got -2"

"""scripts/gpu_check.py is run on a GPU only when one is lent; its CPU dry run keeps it honest here."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_on_cpu_passes_every_check():
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--small", "--new-tokens", "12"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("[PASS]") == 15 and "[FAIL]" not in proc.stdout
    assert "0 failed" in proc.stdout
    assert "decode batch 64" in proc.stdout and "prefill 8 x 512 tokens" in proc.stdout

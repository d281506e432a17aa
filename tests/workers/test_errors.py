"""Bad model path, tp too large, unsupported architecture, bad dtype: clear errors, no tracebacks."""
import json
import subprocess
import sys

import pytest

from workers.config import ModelConfig
from workers.errors import ConfigError, ModelNotFoundError, UnsupportedArchitectureError
from workers.launcher import LocalWorkerGroup
from workers.model_source import resolve_model
from workers.worker import WorkerSpec


def test_missing_model_path_names_it(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither a folder"):
        resolve_model(str(tmp_path / "nope"))


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="no \\*.safetensors"):
        resolve_model(str(tmp_path))


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match="'bert'.*supported: llama, mistral, qwen2, gpt2"):
        ModelConfig.from_dict({"model_type": "bert", "architectures": ["BertModel"]})


def test_tp_above_query_heads_is_refused_before_any_process_starts(tiny_llama_dir):
    spec = WorkerSpec(str(tiny_llama_dir), tp_size=10)
    with pytest.raises(ConfigError, match="tp=10 must be between 1 and the model's 9 query heads"):
        spec.validate(ModelConfig.from_pretrained(tiny_llama_dir))


def test_worker_start_failure_surfaces_as_one_error_and_leaves_no_process(tmp_path, tiny_llama_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="rank [01] failed to start") as info:
        LocalWorkerGroup(WorkerSpec(str(bad), tp_size=2))
    assert info.type.__name__ == "WorkerError"


@pytest.mark.parametrize(("args", "needle"), [
    (["--model", "/no/such/model"], "neither a folder"),
    (["--tp", "10"], "tp=10 must be between 1 and the model's 9 query heads"),
    (["--dtype", "int3"], "dtype: 'int3' is not one of"),
    (["--device", "tpu"], "device: 'tpu' is not one of"),
    (["--max-tokens", "0"], "--max-tokens: must be >= 1"),
])
def test_cli_errors_are_one_line_without_traceback(args, needle, smollm2_dir):
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--prompt", "hi", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


QWEN2 = {"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "sliding_window": 4}


def test_qwen2_biases_are_on_qkv_only_and_its_unused_window_is_ignored():
    cfg = ModelConfig.from_dict({**QWEN2, "use_sliding_window": False})
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.sliding_window) == (True, False, None)


def test_qwen2_with_a_per_layer_sliding_window_is_refused_by_name():
    with pytest.raises(UnsupportedArchitectureError, match="use_sliding_window"):
        ModelConfig.from_dict({**QWEN2, "use_sliding_window": True})

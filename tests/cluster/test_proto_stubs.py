"""The committed stubs are exactly what the .proto sources generate."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_regenerated_stubs_equal_the_committed_ones(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    committed = ROOT / "cluster" / "api"
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh == sorted(p.relative_to(committed) for p in committed.rglob("*") if p.is_file()
                           and "__pycache__" not in p.parts)
    for rel in fresh:
        assert (tmp_path / rel).read_text() == (committed / rel).read_text(), f"{rel} is stale: run scripts/gen_proto.py"

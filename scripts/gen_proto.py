"""Generate the Python stubs of proto/tpserve/v1/*.proto into cluster/api/ (committed).

    python scripts/gen_proto.py [--out DIR]

protoc writes `from tpserve.v1 import tpserve_pb2`; the stubs live under the `cluster.api`
package, so that import is rewritten. A test regenerates into a temporary folder and compares.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--pyi_out={out}",
                      f"--grpc_python_out={out}", *protos])
    if rc != 0:
        raise SystemExit(f"protoc failed ({rc})")
    files = sorted(p for p in out.rglob("*.py*") if p.suffix in (".py", ".pyi"))
    for f in files:
        text = re.sub(r"^from tpserve\.v1 import", "from cluster.api.tpserve.v1 import", f.read_text(), flags=re.M)
        f.write_text(text)
    for d in {f.parent for f in files} | {out / "tpserve", out}:
        (d / "__init__.py").touch()
    return files


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "cluster" / "api"))
    for f in generate(Path(ap.parse_args().out)):
        print(f.relative_to(ROOT) if f.is_relative_to(ROOT) else f, file=sys.stderr)

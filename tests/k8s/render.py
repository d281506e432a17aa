"""Render overlays with the pinned kubectl's kustomize, and validate strictly, offline."""
from __future__ import annotations

import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
SCHEMAS = ROOT.parent / "shared" / "k8s-schemas"
OVERLAYS = ("cpu-dev", "gpu")
K8S_VERSION = "1.33.0"


def kubectl() -> str:
    local = Path(sys.executable).parent / "kubectl"
    return str(local) if local.exists() else shutil.which("kubectl")


@cache
def render(overlay: str) -> tuple[dict, ...]:
    out = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def find(docs, kind: str, name: str | None = None) -> dict:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} documents"
    return hits[0]


def strict(schema: dict) -> dict:
    """A CRD's openAPIV3Schema as JSON Schema where unknown fields fail (as the API server prunes)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if schema.get("x-kubernetes-int-or-string"):
            schema.pop("type", None)
            schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(x) for x in schema]
    return schema


@cache
def crd_validator(kind: str, version: str = "v1"):
    import jsonschema

    path = SCHEMAS / f"ray.io_{kind.lower()}s.yaml"
    assert path.is_file(), f"KubeRay CRD {path} is missing: shared/ must sit beside the checkout"
    crd = yaml.safe_load(path.read_text())
    schema = next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version)
    return jsonschema.Draft7Validator(strict(schema))


def crd_errors(doc: dict) -> list[str]:
    v = crd_validator(doc["kind"], doc["apiVersion"].split("/")[1])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]

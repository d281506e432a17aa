"""The architecture doc names files and symbols; each one it names must exist in the code."""
from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
PROSE = {"OpenAI", "KServe", "FastAPI", "PyTorch", "GitHub"}  # names of things outside the code


@lru_cache(maxsize=1)
def definitions() -> tuple[dict[str, set[str]], set[str]]:
    """class name -> its methods and attributes (assigned in the body or on self), and every
    function and class name defined at any level in cluster/, workers/."""
    members: dict[str, set[str]] = {}
    names: set[str] = set()
    for proto in ROOT.glob("proto/**/*.proto"):  # the wire messages (GenerateRequest ...)
        names.update(re.findall(r"^\s*message\s+(\w+)", proto.read_text(), flags=re.M))
    for path in [*ROOT.glob("cluster/**/*.py"), *ROOT.glob("workers/**/*.py")]:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.ClassDef):
                names.add(node.name)
                have = members.setdefault(node.name, set())
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        have.add(sub.name)
                    elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name):
                        have.add(sub.target.id)
                    elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) \
                            and sub.value.id == "self":
                        have.add(sub.attr)
    return members, names


def doc_files() -> list[str]:
    """Paths the doc's tables name: a `.py` file or a folder, relative to the section's package."""
    out, base = [], ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            base = title if title in ("workers/", "cluster/") else ""
        if not line.startswith("| `") or not base:
            continue
        first_cell = line.split("|")[1]
        out += [base + name for name in re.findall(r"`([\w/]+(?:\.py|/))`", first_cell)]
    return out


def doc_symbols() -> list[str]:
    """Backticked CamelCase names (classes), alone or as Class.member."""
    found = re.findall(r"`([A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*(?:\.[a-z_][a-z0-9_]*)?)`", DOC.read_text())
    path = DOC.read_text().split("## The request path", 1)[1].split("\n## ", 1)[0]  # the drawn path, unquoted
    found += re.findall(r"\b([A-Z][a-z]+[A-Z][A-Za-z]*(?:\.[a-z_][a-z0-9_]*)?)\b", path)
    found += re.findall(r"\b([A-Z][A-Za-z]+\.[a-z_][a-z0-9_]*)\b", path)  # Router.place, Worker.step
    return sorted(set(found) - PROSE)


def test_every_file_the_architecture_doc_names_exists():
    files = doc_files()
    assert len(files) > 40  # the tables were read
    missing = [f for f in files if not (ROOT / f).exists()]
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


def test_every_class_and_method_the_architecture_doc_names_exists():
    members, names = definitions()
    symbols = doc_symbols()
    assert "EngineCore.step" in symbols and "ModelledExecutor" in symbols  # the doc was read
    missing = []
    for sym in symbols:
        cls, _, member = sym.partition(".")
        if cls not in names:
            missing.append(sym)
        elif member and member not in members.get(cls, set()):
            missing.append(sym)
    assert not missing, f"docs/architecture.md names symbols the code does not define: {missing}"

"""The vendored runtime's manifest: ``template/src/backend_common/MANIFEST.json``.

It records the runtime's version (``backend_common.__version__``) and the sha256 of every
file of the package, so a generated project can prove its vendored copy is unedited
(its ``tests/test_vendored_runtime.py``). ``write_manifest`` regenerates it after the
runtime changed; ``check_manifest`` lists what is stale (CI fails on a non-empty list).
Caches (``__pycache__``, ``*.pyc``) are not part of the runtime.
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path
from typing import Any

from .render import REPO_ROOT

__all__ = [
    "MANIFEST_NAME",
    "RUNTIME_DIR",
    "build_manifest",
    "check_manifest",
    "manifest_text",
    "runtime_files",
    "write_manifest",
]

RUNTIME_DIR = REPO_ROOT / "template" / "src" / "backend_common"
MANIFEST_NAME = "MANIFEST.json"


def runtime_files(root: Path = RUNTIME_DIR) -> list[str]:
    """The runtime's files as sorted POSIX paths relative to ``root`` (manifest excluded)."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file()
        and p.name != MANIFEST_NAME
        and "__pycache__" not in p.parts
        and p.suffix != ".pyc"
    )


def _version(root: Path) -> str:
    tree = ast.parse((root / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            return node.value.value
    raise ValueError(f"{root / '__init__.py'} defines no __version__ string")


def build_manifest(root: Path = RUNTIME_DIR) -> dict[str, Any]:
    return {
        "name": root.name,
        "version": _version(root),
        "files": {
            rel: hashlib.sha256((root / rel).read_bytes()).hexdigest()
            for rel in runtime_files(root)
        },
    }


def manifest_text(root: Path = RUNTIME_DIR) -> str:
    return json.dumps(build_manifest(root), indent=2, sort_keys=True) + "\n"


def write_manifest(root: Path = RUNTIME_DIR) -> Path:
    path = root / MANIFEST_NAME
    path.write_text(manifest_text(root), encoding="utf-8")
    return path


def check_manifest(root: Path = RUNTIME_DIR) -> list[str]:
    """What makes the committed manifest stale: one line per problem; empty when current."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        return [f"{path} is missing (run: python -m generator manifest)"]
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        return [f"{path} is not valid JSON: {exc}"]
    current = build_manifest(root)
    problems = []
    if recorded.get("version") != current["version"]:
        problems.append(
            f"version: manifest {recorded.get('version')!r}, runtime {current['version']!r}"
        )
    old, new = recorded.get("files") or {}, current["files"]
    problems += [f"added, not in manifest: {rel}" for rel in sorted(new.keys() - old.keys())]
    problems += [f"listed, but removed: {rel}" for rel in sorted(old.keys() - new.keys())]
    problems += [
        f"changed since the manifest was written: {rel}"
        for rel in sorted(new.keys() & old.keys())
        if new[rel] != old[rel]
    ]
    if not problems and path.read_text(encoding="utf-8") != manifest_text(root):
        problems.append(f"{path} is not in canonical form (run: python -m generator manifest)")
    return problems

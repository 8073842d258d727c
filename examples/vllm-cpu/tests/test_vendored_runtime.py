"""The vendored runtime (``src/backend_common``) is exactly what the template shipped.

Never edit it here: ``copier update`` replaces it, and a local edit would be lost or turn
into a conflict. ``MANIFEST.json`` records the sha256 of every file; this test fails when
a file was edited, added or removed. To undo local edits: ``git checkout src/backend_common``.
A fix belongs upstream, in the template's ``template/src/backend_common``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import backend_common

RUNTIME = Path(__file__).resolve().parent.parent / "src" / "backend_common"
MANIFEST = json.loads((RUNTIME / "MANIFEST.json").read_text(encoding="utf-8"))


def _files_on_disk() -> set[str]:
    return {
        p.relative_to(RUNTIME).as_posix()
        for p in RUNTIME.rglob("*")
        if p.is_file()
        and p.name != "MANIFEST.json"
        and "__pycache__" not in p.parts
        and p.suffix != ".pyc"
    }


def test_the_imported_runtime_is_the_vendored_one() -> None:
    assert Path(backend_common.__file__).resolve().parent == RUNTIME


def test_manifest_version_is_the_runtime_version() -> None:
    assert MANIFEST["version"] == backend_common.__version__


def test_no_vendored_file_was_added_or_removed() -> None:
    on_disk, listed = _files_on_disk(), set(MANIFEST["files"])
    assert on_disk - listed == set(), "files added to the vendored runtime"
    assert listed - on_disk == set(), "files removed from the vendored runtime"


def test_no_vendored_file_was_edited() -> None:
    edited = [
        rel
        for rel, digest in sorted(MANIFEST["files"].items())
        if (RUNTIME / rel).is_file()
        and hashlib.sha256((RUNTIME / rel).read_bytes()).hexdigest() != digest
    ]
    assert edited == [], f"vendored files edited locally (restore them with git): {edited}"

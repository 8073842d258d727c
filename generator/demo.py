"""``python -m generator demo``: generate a backend and watch the real frontend use it.

The main job of this repository in one command (``make demo``):

1. render a backend from this template into DEST (default ``build/demo-backend``,
   engine kind and other answers as given, e.g. ``engine_kind=mocker``);
2. start the generated backend (``python -m <package>``) with file discovery,
   so neither etcd nor NATS is needed, plus the real Dynamo 1.6.1 frontend;
3. send one chat request through the frontend and print the curl command and
   the answer;
4. stop both processes (also on failure) and leave DEST for you to explore.

The backend runs on this repository's ``.venv`` (it has every runtime
dependency); the frontend on ``.venv-dynamo`` (``make frontend``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

from .render import REPO_ROOT, parse_data, render_for_user

DEFAULT_DEST = REPO_ROOT / "build" / "demo-backend"
MODEL = "demo-model"


def _chat(base_url: str) -> tuple[str, dict]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "w1 w2 w3 hello"}],
        "max_tokens": 12,
    }
    data = json.dumps(body).encode()
    curl = (
        f"curl -s {base_url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-d '{json.dumps(body)}'"
    )
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        return curl, json.loads(resp.read())


def run_demo(dest: Path, answers: dict[str, str]) -> int:
    # Imported here: the runtime lives in the template, not in this package.
    sys.path.insert(0, str(REPO_ROOT / "template" / "src"))
    from backend_common.devstack.frontend import (
        Frontend,
        find_frontend_python,
        hermetic_env,
        worker_env,
    )
    from backend_common.devstack.services import ManagedProcess, free_port
    from backend_common.devstack.tinymodel import write_tiny_model

    frontend_python = find_frontend_python()
    if frontend_python is None:
        print(
            "error: the real Dynamo frontend is not installed; run `make frontend`", file=sys.stderr
        )
        return 2
    if dest.exists():
        shutil.rmtree(dest)
    answers.setdefault("project_name", "demo-backend")
    render_for_user(dest, answers, vcs_ref="HEAD")
    package = answers.get("package_name", answers["project_name"].replace("-", "_"))
    print(f"Generated {dest} (package {package}).")

    work = Path(tempfile.mkdtemp(prefix="dynamo-demo-"))
    model_dir = write_tiny_model(work / "model")
    frontend = Frontend(workdir=work, python=frontend_python, discovery_backend="file")
    env = worker_env(discovery_backend="file", file_kv=frontend.file_kv, system_port=free_port())
    env["PYTHONPATH"] = str(dest / "src")
    argv = [sys.executable, "-m", package, "--model-path", str(model_dir), "--model-name", MODEL]
    argv += ["--discovery-backend", "file", "--request-plane", "tcp"]
    backend = ManagedProcess(argv, env=hermetic_env(env), log_path=work / "backend.log", cwd=dest)
    try:
        frontend.start()
        backend.start()
        print(f"Started the real Dynamo frontend on {frontend.base_url} and the backend.")
        frontend.wait_for_model(MODEL, timeout=120, watch=[backend])
        curl, answer = _chat(frontend.base_url)
        print(f"\n$ {curl}\n{json.dumps(answer, indent=2)}\n")
        choice = answer["choices"][0]
        ok = bool(choice["message"]["content"]) and choice["finish_reason"] in ("stop", "length")
        print(
            "The generated backend answered through the real frontend."
            if ok
            else "Unexpected answer."
        )
        print(f"Explore it: cd {dest} && make test")
        return 0 if ok else 1
    except Exception as exc:  # noqa: BLE001 - report with the logs, then stop everything
        print(f"error: {exc}\n--- backend log ---\n{backend.log_tail()}", file=sys.stderr)
        return 1
    finally:
        backend.terminate(timeout=15)
        frontend.stop()
        if not os.environ.get("KEEP_DEMO_LOGS"):
            shutil.rmtree(work, ignore_errors=True)


def main(dest: str | None, data: list[str]) -> int:
    try:
        answers = parse_data(data)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_demo(Path(dest).resolve() if dest else DEFAULT_DEST, answers)

"""``make run``: the real Dynamo frontend and this backend's worker(s) on 127.0.0.1.

Discovery is file based (a directory under ``.run/``), so no etcd is needed; the request
plane is the project's default (tcp). Without ``--model-path`` a tiny model
(random weights) is written to ``.run/model``.
``make run`` installs the frontend into ``.venv-dynamo`` first (or uses
``DYNAMO_FRONTEND_PYTHON``); run directly without one, the script starts the worker(s) alone.
Ctrl-C stops everything this script started.

    make run RUN_ARGS="--http-port 8001 -- --delay 0.05"   (after --: worker flags)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from backend_common.devstack.frontend import (
    Frontend,
    find_frontend_python,
    hermetic_env,
    worker_env,
)
from backend_common.devstack.services import NatsServer, free_port
from backend_common.devstack.tinyllm import write_tiny_llama as write_tiny_model

from vllm_cpu_backend.args import DEFAULT_REQUEST_PLANE, SUPPORTED_MODES

RUN_DIR = Path(".run")
# Worker flags of each role of a run mode (the prefill worker registers under its own
# component, as Dynamo's prefill workers do).
MODES: dict[str, dict[str, list[str]]] = {
    "agg": {"aggregated": []},
    "disagg": {
        "prefill": ["--disaggregation-mode", "prefill", "--component", "prefill"],
        "decode": ["--disaggregation-mode", "decode"],
    },
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", help="model directory (default: a tiny tokenizer-only one)")
    parser.add_argument("--model-name", default="tiny", help="served model name")
    parser.add_argument("--http-port", type=int, default=8000, help="frontend port")
    disagg = "prefill" in {mode.value for mode in SUPPORTED_MODES}
    parser.add_argument(
        "--mode",
        choices=sorted(MODES) if disagg else ["agg"],
        default="disagg" if disagg else "agg",
        help="aggregated worker, or prefill + decode workers",
    )
    parser.add_argument("worker_args", nargs="*", help="extra worker flags (after --)")
    args = parser.parse_args()
    # SIGTERM (e.g. from a supervisor) stops everything like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)

    RUN_DIR.mkdir(exist_ok=True)
    model_path = args.model_path or str(write_tiny_model(RUN_DIR / "model"))
    file_kv = (RUN_DIR / "filekv").absolute()
    with contextlib.ExitStack() as stack:
        nats_url = None
        if DEFAULT_REQUEST_PLANE == "nats":
            nats = NatsServer(log_path=RUN_DIR / "nats.log").start()
            stack.callback(nats.stop)
            nats_url = nats.url
        frontend_python = find_frontend_python()
        frontend = None
        if frontend_python is not None:
            frontend = Frontend(
                workdir=RUN_DIR / "frontend",
                python=frontend_python,
                file_kv=file_kv,
                request_plane=DEFAULT_REQUEST_PLANE,
                nats_url=nats_url,
                http_port=args.http_port,
            ).start()
            stack.callback(frontend.stop)
        else:
            print("No Dynamo frontend installed (`make frontend`): running the backend alone.")
        argv = [sys.executable, "-m", "vllm_cpu_backend", "--model-path", model_path]
        argv += ["--model-name", args.model_name, "--discovery-backend", "file"]
        # A small CPU footprint for the tiny model; vLLM's own flags pass through
        # (`make run RUN_ARGS="-- --max-model-len 4096"`).
        argv += ["--enforce-eager", "--dtype", "float32", "--max-model-len", "512"]
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        workers = []
        for role, role_args in MODES[args.mode].items():
            env = worker_env(
                discovery_backend="file",
                file_kv=file_kv,
                request_plane=DEFAULT_REQUEST_PLANE,
                nats_url=nats_url,
                system_port=free_port(),
            )
            port = env["DYN_SYSTEM_PORT"]
            print(f"Starting the {role} worker (system port {port}).", flush=True)
            worker = subprocess.Popen([*argv, *role_args, *args.worker_args], env=hermetic_env(env))
            stack.callback(_stop, worker)
            workers.append(worker)
        if frontend is not None:
            frontend.wait_for_model(args.model_name, timeout=240)
            body = json.dumps(
                {
                    "model": args.model_name,
                    "max_tokens": 16,
                    "messages": [{"role": "user", "content": "hello"}],
                }
            )
            print(
                f"\nReady. Try:\n  curl -s {frontend.base_url}/v1/chat/completions "
                f"-H 'Content-Type: application/json' -d '{body}'\nCtrl-C stops everything.\n",
                flush=True,
            )
        try:
            # Until Ctrl-C, or until any worker exits (then the others are stopped too).
            while all(worker.poll() is None for worker in workers):
                time.sleep(0.5)
            return next(w.returncode for w in workers if w.returncode is not None)
        except KeyboardInterrupt:
            return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


if __name__ == "__main__":
    sys.exit(main())

"""``make aiperf`` (and ``make bench``): aiperf against this worker behind the real frontend.

Starts, all on 127.0.0.1 with free ports, the real Dynamo frontend (file discovery under
``.run/bench``) and ONE aggregated worker of
this backend; waits until the frontend lists the model; then runs ``aiperf profile`` once per
concurrency level of ``--concurrency`` (a sweep, one level after the other, each with its own
artifact directory under ``.run/bench/aiperf/c<N>``) and prints a summary table: output
tokens/s, requests/s, TTFT and ITL percentiles, errors. The summary is also written to
``.run/bench/aiperf-summary.json``.
Everything this script started is stopped when it ends, also after a failure or Ctrl-C.

The tokenizer aiperf builds its prompts with is the model directory the worker serves
(``--model-path``; without it a tiny random-weight model is written to ``.run/bench/model``).
aiperf counts tokens as the server reports them (``--use-server-token-count``).

aiperf (``aiperf==AIPERF_VERSION`` of ``backend_common.devstack.aiperf``) is installed into
``.venv-aiperf`` on first use, never by ``make install`` (about 1.2 GB); later runs reuse it.
``--dry-run`` prints the aiperf command of every level and whether aiperf would be installed
first, and starts nothing.

    make aiperf AIPERF_ARGS="--concurrency 1,8,32 --requests 200 -- --some-worker-flag"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from backend_common.devstack.aiperf import (
    AIPERF_VERSION,
    AiperfError,
    aiperf_command,
    ensure_aiperf,
    installed_aiperf,
    run_aiperf,
)
from backend_common.devstack.frontend import (
    Frontend,
    find_frontend_python,
    hermetic_env,
    worker_env,
)
from backend_common.devstack.services import NatsServer, free_port
from backend_common.devstack.tinyllm import write_tiny_llama as write_tiny_model

from vllm_cpu_backend.args import DEFAULT_REQUEST_PLANE

RUN_DIR = Path(".run") / "bench"
AIPERF_VENV = Path(".venv-aiperf")
READY_TIMEOUT_S = 300.0
# One level's aiperf run may take this long at most (a bound, not an estimate).
LEVEL_TIMEOUT_S = 900.0
DEFAULT_CONCURRENCY = "1,4,16"
DEFAULT_REQUESTS = 40
DEFAULT_MAX_TOKENS = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", help="model directory (default: a tiny one)")
    parser.add_argument("--model-name", default="bench-model", help="served model name")
    parser.add_argument(
        "--concurrency",
        default=DEFAULT_CONCURRENCY,
        help=f"comma-separated levels (default {DEFAULT_CONCURRENCY})",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=DEFAULT_REQUESTS,
        help=f"requests per level, at least 2 per slot (default {DEFAULT_REQUESTS})",
    )
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--dry-run", action="store_true", help="print the aiperf commands only")
    parser.add_argument("worker_args", nargs="*", help="extra worker flags (after --)")
    args = parser.parse_args(argv)
    try:
        args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--concurrency: comma-separated integers, got {args.concurrency!r}")
    if not args.levels or min(args.levels) < 1 or args.requests < 1 or args.max_tokens < 1:
        parser.error("--concurrency levels, --requests and --max-tokens must be >= 1")
    return args


def level_commands(
    aiperf: Path | str, url: str, args: argparse.Namespace, model_path: str
) -> list[tuple[int, Path, list[str]]]:
    """``(concurrency, artifact dir, aiperf argv)`` for every level of the sweep."""
    out = []
    for c in args.levels:
        artifacts = (RUN_DIR / "aiperf" / f"c{c}").absolute()
        argv = aiperf_command(
            aiperf,
            url=url,
            model=args.model_name,
            tokenizer=model_path,
            concurrency=c,
            requests=max(args.requests, 2 * c),
            warmup=c,
            max_tokens=args.max_tokens,
            artifact_dir=artifacts,
            prompt_tokens=args.prompt_tokens,
        )
        out.append((c, artifacts, argv))
    return out


def _fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_summary(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'c':>5} {'requests':>8} {'out tok/s':>10} {'req/s':>8} {'TTFT p50':>9} "
        f"{'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'errors':>6}"
    )
    for row in rows:
        if row.get("error"):
            print(f"{row['concurrency']:>5} FAILED: {row['error'][:200]}")
            continue
        print(
            f"{row['concurrency']:>5} {_fmt(row['requests'], 0):>8} "
            f"{_fmt(row['output_tokens_per_s'], 0):>10} {_fmt(row['requests_per_s']):>8} "
            f"{_fmt(row['ttft_ms_p50'], 2):>9} {_fmt(row['ttft_ms_p99'], 2):>9} "
            f"{_fmt(row['itl_ms_p50'], 3):>8} {_fmt(row['itl_ms_p99'], 3):>8} {row['errors']:>6}"
        )
    print("(aiperf; latencies in ms; output tokens as the server counts them)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a supervisor's SIGTERM stops like Ctrl-C
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    model_path = args.model_path or str(write_tiny_model(RUN_DIR / "model"))
    if args.dry_run:
        present = installed_aiperf(AIPERF_VENV)
        state = "installed" if present else "to be installed on first use"
        print(f"aiperf=={AIPERF_VERSION} in {AIPERF_VENV}: {state}")
        aiperf = present or AIPERF_VENV / "bin" / "aiperf"
        for _c, _dir, cmd in level_commands(aiperf, "http://127.0.0.1:<port>", args, model_path):
            print(" ".join(cmd))
        return 0
    frontend_python = find_frontend_python()
    if frontend_python is None:
        print("error: no Dynamo frontend (`make frontend` or DYNAMO_FRONTEND_PYTHON)")
        return 2
    try:
        aiperf = ensure_aiperf(AIPERF_VENV)
    except AiperfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    file_kv = (RUN_DIR / "filekv").absolute()
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        nats_url = None
        if DEFAULT_REQUEST_PLANE == "nats":
            nats = NatsServer(log_path=RUN_DIR / "nats.log").start()
            stack.callback(nats.stop)
            nats_url = nats.url
        frontend = Frontend(
            workdir=RUN_DIR / "frontend",
            python=frontend_python,
            file_kv=file_kv,
            request_plane=DEFAULT_REQUEST_PLANE,
            nats_url=nats_url,
        ).start()
        stack.callback(frontend.stop)
        env = worker_env(
            discovery_backend="file",
            file_kv=file_kv,
            request_plane=DEFAULT_REQUEST_PLANE,
            nats_url=nats_url,
            system_port=free_port(),
        )
        worker_argv = [sys.executable, "-m", "vllm_cpu_backend", "--model-path", model_path]
        worker_argv += ["--model-name", args.model_name, "--discovery-backend", "file"]
        # A small CPU footprint for the tiny model (as `make run`); later flags win.
        worker_argv += ["--enforce-eager", "--dtype", "float32", "--max-model-len", "512"]
        if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:  # the operator's value wins
            env["VLLM_CPU_KVCACHE_SPACE"] = "1"
        worker_argv += args.worker_args
        log = (RUN_DIR / "worker.log").open("wb")
        stack.callback(log.close)
        worker = subprocess.Popen(
            worker_argv, env=hermetic_env(env), stdout=log, stderr=subprocess.STDOUT
        )
        stack.callback(_stop, worker)
        print(f"bench: waiting for the worker (log: {RUN_DIR / 'worker.log'})", flush=True)
        frontend.wait_for_model(args.model_name, timeout=READY_TIMEOUT_S)
        try:
            for c, artifacts, cmd in level_commands(aiperf, frontend.base_url, args, model_path):
                print(f"bench: aiperf at concurrency {c}", flush=True)
                row: dict[str, Any] = {"concurrency": c}
                try:
                    row.update(run_aiperf(cmd, artifact_dir=artifacts, timeout=LEVEL_TIMEOUT_S))
                except AiperfError as exc:
                    row["error"] = str(exc)
                rows.append(row)
                if worker.poll() is not None:
                    rows.append({"concurrency": c, "error": "the worker exited"})
                    break
        except KeyboardInterrupt:
            print("bench: interrupted", file=sys.stderr)
    summary = {"aiperf_version": AIPERF_VERSION, "model_path": model_path, "levels": rows}
    (RUN_DIR / "aiperf-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(rows)
    print(f"\nwrote {RUN_DIR / 'aiperf-summary.json'}; aiperf artifacts under {RUN_DIR / 'aiperf'}")
    return 1 if any(r.get("error") or r.get("errors") for r in rows) else 0


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

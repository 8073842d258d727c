"""Bounded shutdown of a worker process (``tests/foreign_engine.py``, file discovery, no frontend).

* ``cleanup()`` never returns: the process exits at the overall deadline (grace + drain +
  cleanup budgets + the worker's fixed steps, ``Worker.shutdown_deadline``) with code 124
  and says what it was waiting for.
* An engine that installs its own SIGTERM/SIGINT loop handlers in ``start()`` does not take
  shutdown away from the worker (a warning says so).
* A signal during ``start()``: no registration, then ``cleanup()`` once, exit 0.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from conftest import REPO, RUNTIME_SRC, wait_until
from reliability_results import record

from backend_common.config import WorkerConfig
from backend_common.devstack.frontend import hermetic_env, worker_env
from backend_common.devstack.services import ManagedProcess
from backend_common.reference import ReferenceEngine
from backend_common.runtime.worker import (
    FIXED_SHUTDOWN_STEPS_S,
    SHUTDOWN_DEADLINE_EXIT_CODE,
    Worker,
)

GRACE_S, DRAIN_S, CLEANUP_S = 0.2, 1.0, 1.0
DEADLINE_S = GRACE_S + DRAIN_S + CLEANUP_S + FIXED_SHUTDOWN_STEPS_S
# Interpreter exit and process reaping on a loaded 2-core machine.
EXIT_SLACK_S = 3.0


def start_worker(tmp_path: Path, *args: str) -> ManagedProcess:
    env = worker_env(discovery_backend="file", file_kv=tmp_path / "kv")
    env["PYTHONPATH"] = os.pathsep.join([str(RUNTIME_SRC), str(REPO)])
    env["DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS"] = str(GRACE_S)
    env["DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT"] = str(DRAIN_S)
    env["DYN_WORKER_SHUTDOWN_CLEANUP_TIMEOUT_SECS"] = str(CLEANUP_S)
    env["DYN_SYSTEM_PORT"] = "-1"  # 1.6.1's "no status server"
    argv = [sys.executable, "-m", "tests.foreign_engine", "--model-name", "sd", *args]
    proc = ManagedProcess(argv, env=hermetic_env(env), log_path=tmp_path / "worker.log", cwd=REPO)
    proc.start()
    return proc


def log_of(proc: ManagedProcess) -> str:
    assert proc.log_path is not None
    return proc.log_path.read_text(errors="replace")


def records(tmp_path: Path) -> list[Path]:
    root = tmp_path / "kv"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_deadline_is_grace_plus_drain_plus_cleanup() -> None:
    defaults = Worker(ReferenceEngine(), WorkerConfig())
    # 1.6.1's defaults: grace 5 s, drain 30 s; cleanup gets the drain timeout.
    assert defaults.shutdown_deadline() == 5.0 + 30.0 + 30.0 + FIXED_SHUTDOWN_STEPS_S
    custom = WorkerConfig(
        graceful_shutdown_grace_period=1,
        graceful_shutdown_timeout=2,
        graceful_shutdown_cleanup_timeout=3,
    )
    assert Worker(ReferenceEngine(), custom).shutdown_deadline() == 6 + FIXED_SHUTDOWN_STEPS_S


def test_cleanup_that_never_returns_exits_124_at_the_deadline(tmp_path: Path) -> None:
    proc = start_worker(tmp_path, "--cleanup-hangs")
    try:
        wait_until(lambda: "Serving sd" in log_of(proc), 60, message=log_of(proc)[-2000:])
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(DEADLINE_S + EXIT_SLACK_S + 10)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
    text = log_of(proc)
    named = f"Graceful shutdown exceeded {DEADLINE_S:.1f}s while waiting for engine.cleanup()"
    record(
        "shutdown_deadline",
        title="`cleanup()` never returns, SIGTERM",
        order=22,
        bounds=[
            f"exit code {SHUTDOWN_DEADLINE_EXIT_CODE} at the overall deadline (grace + drain + "
            f"cleanup budgets + {FIXED_SHUTDOWN_STEPS_S:.0f} s of fixed steps), between 0.5 s "
            f"before it and {EXIT_SLACK_S:.0f} s after",
            "the log names what shutdown waited for",
        ],
        summary=(
            f"grace {GRACE_S} s, drain {DRAIN_S:.0f} s, cleanup {CLEANUP_S:.0f} s -> deadline "
            f"{DEADLINE_S:.1f} s: exited {elapsed:.2f} s after SIGTERM with {rc}; "
            f"{'named engine.cleanup()' if named in text else 'reason NOT logged'}"
        ),
        measured={"deadline_s": DEADLINE_S, "elapsed_s": round(elapsed, 3), "rc": rc},
    )
    assert rc == SHUTDOWN_DEADLINE_EXIT_CODE, text[-2000:]
    assert DEADLINE_S - 0.5 <= elapsed <= DEADLINE_S + EXIT_SLACK_S, elapsed
    assert "EVENT cleanup begin" in text and "EVENT cleanup done" not in text
    assert named in text
    assert not records(tmp_path)  # it had left discovery before cleanup


def test_engine_signal_handlers_do_not_replace_the_workers(tmp_path: Path) -> None:
    proc = start_worker(tmp_path, "--grab-signals")
    try:
        wait_until(lambda: "Serving sd" in log_of(proc), 60, message=log_of(proc)[-2000:])
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(DEADLINE_S + EXIT_SLACK_S)
    finally:
        proc.kill()
    text = log_of(proc)
    assert rc == 0, text[-2000:]
    assert "Suppressed engine loop.add_signal_handler(SIGTERM)" in text
    assert "Suppressed engine loop.add_signal_handler(SIGINT)" in text
    assert "EVENT engine-signal-handler" not in text
    assert text.count("EVENT cleanup done") == 1


def test_signal_during_start_means_no_registration_then_cleanup_once(tmp_path: Path) -> None:
    proc = start_worker(tmp_path, "--start-delay", "2")
    try:
        wait_until(lambda: "EVENT start " in log_of(proc), 60, message=log_of(proc)[-2000:])
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(DEADLINE_S + EXIT_SLACK_S)
    finally:
        proc.kill()
    text = log_of(proc)
    assert rc == 0, text[-2000:]
    assert "EVENT started" in text  # start() was not cancelled
    assert "Shutdown signal observed during engine.start(); not registering" in text
    assert "Serving" not in text
    assert text.count("EVENT cleanup begin") == 1 and text.count("EVENT cleanup done") == 1
    assert not records(tmp_path)

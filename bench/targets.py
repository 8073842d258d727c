"""The stack under test and the four workers measured behind it.

``BenchStack(workdir, frontend_python)`` starts etcd and NATS (from the wheels) and ONE real
Dynamo 1.6.1 frontend (etcd discovery, tcp request plane, NATS event plane), all on
127.0.0.1 with free ports; ``stop()`` ends them, also after a failure (it is a context
manager). Each ``Target`` is then served one after the other behind that frontend:
``stack.serve(target)`` starts the worker process, waits until the frontend lists its model
and returns a ``RunningTarget``; ``RunningTarget.stop()`` ends it (SIGTERM, then SIGKILL).

Every target has its own namespace and model name, so a late-leaving worker of one target can
never receive another target's requests. Dynamo's own workers run with ``--event-plane nats``:
their ZMQ publishers would otherwise bind 0.0.0.0 (real-dynamo.md §5), and their
``DYN_SYSTEM_PORT`` comes from ``free_system_port`` (Dynamo refuses ports above 32767).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backend_common.devstack.frontend import (
    Frontend,
    free_system_port,
    hermetic_env,
    worker_env,
)
from backend_common.devstack.services import EtcdServer, ManagedProcess, NatsServer

__all__ = ["TARGETS", "BenchStack", "RunningTarget", "Target", "vm_rss_kib"]

REPO = Path(__file__).resolve().parent.parent
RUNTIME_SRC = REPO / "template" / "src"
MOCKER_SRC = REPO / "examples" / "mocker-cuda" / "src"
READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Launch:
    """What to execute for one target: argv, extra environment, the model name to request."""

    argv: list[str]
    env: dict[str, str]
    model: str


@dataclass(frozen=True)
class Target:
    key: str  # "a".."d": the letter used in the issue and the report
    name: str
    description: str
    ours: bool  # built on backend_common (a, b) or Dynamo's own worker (c, d)
    launch: Callable[[str, Path], Launch]  # (frontend python, tiny model dir) -> Launch


def _ours(module: str, src: Path, namespace: str, model: str, *extra: str) -> Callable:
    def launch(_frontend_python: str, model_dir: Path) -> Launch:
        argv = [sys.executable, "-m", module, "--model-path", str(model_dir)]
        argv += ["--model-name", model, "--namespace", namespace, "--event-plane", "nats"]
        return Launch([*argv, *extra], {"PYTHONPATH": str(src)}, model)

    return launch


def _sample(frontend_python: str, model_dir: Path) -> Launch:
    # The sample backend loads its tokenizer from --model-name, so the name is the path.
    model = str(model_dir.absolute())
    argv = [frontend_python, "-m", "dynamo.common.backend.sample_main", "--model-name", model]
    argv += ["--namespace", "bench-c", "--delay", "0", "--event-plane", "nats"]
    return Launch(argv, {}, model)


def _dynamo_mocker(frontend_python: str, model_dir: Path) -> Launch:
    model = "bench-d-dynamo-mocker"
    argv = [frontend_python, "-m", "dynamo.mocker", "--model-path", str(model_dir)]
    argv += ["--model-name", model, "--endpoint", "dyn://bench-d.backend.generate"]
    argv += ["--speedup-ratio", "100", "--event-plane", "nats"]
    return Launch(argv, {}, model)


TARGETS: dict[str, Target] = {
    t.key: t
    for t in (
        Target(
            "a",
            "backend_common reference",
            "backend_common + ReferenceEngine, --delay 0",
            True,
            _ours(
                "backend_common.reference",
                RUNTIME_SRC,
                "bench-a",
                "bench-a-reference",
                "--delay",
                "0",
            ),
        ),
        Target(
            "b",
            "mocker-cuda example",
            "examples/mocker-cuda (rendered template), --speedup-ratio 1000",
            True,
            _ours(
                "mocker_cuda",
                MOCKER_SRC,
                "bench-b",
                "bench-b-mocker-cuda",
                "--speedup-ratio",
                "1000",
            ),
        ),
        Target(
            "c",
            "Dynamo sample backend",
            "dynamo.common.backend.sample_main --delay 0 (Python engine, Rust worker)",
            False,
            _sample,
        ),
        Target(
            "d",
            "Dynamo mocker",
            "dynamo.mocker --speedup-ratio 100 (Rust)",
            False,
            _dynamo_mocker,
        ),
    )
}


def vm_rss_kib(pid: int) -> int | None:
    """Resident memory of ``pid`` (``VmRSS`` of /proc/<pid>/status) in KiB; None if unknown."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class RunningTarget:
    def __init__(self, target: Target, launch: Launch, proc: ManagedProcess) -> None:
        self.target = target
        self.model = launch.model
        self.proc = proc

    def rss_kib(self) -> int | None:
        return vm_rss_kib(self.proc.pid) if self.proc.pid is not None else None

    def stop(self) -> None:
        self.proc.terminate(timeout=15)


class BenchStack:
    """etcd + NATS + one real frontend on loopback (see the module docstring)."""

    def __init__(self, workdir: Path, frontend_python: str, model_dir: Path) -> None:
        self.workdir = workdir
        self.frontend_python = frontend_python
        self.model_dir = model_dir
        self.etcd = EtcdServer(workdir / "etcd")
        self.nats = NatsServer(log_path=workdir / "nats.log")
        self.frontend: Frontend | None = None

    def start(self) -> BenchStack:
        try:
            self.etcd.start()
            self.nats.start()
            self.frontend = Frontend(
                workdir=self.workdir / "frontend",
                python=self.frontend_python,
                discovery_backend="etcd",
                etcd_endpoint=self.etcd.endpoint,
                nats_url=self.nats.url,
                request_plane="tcp",
                event_plane="nats",
            ).start()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def base_url(self) -> str:
        assert self.frontend is not None, "start() first"
        return self.frontend.base_url

    def serve(self, target: Target) -> RunningTarget:
        """Start ``target``'s worker and return once the frontend lists its model."""
        assert self.frontend is not None, "start() first"
        launch = target.launch(self.frontend_python, self.model_dir)
        env = worker_env(
            discovery_backend="etcd",
            etcd_endpoint=self.etcd.endpoint,
            nats_url=self.nats.url,
            request_plane="tcp",
            system_port=free_system_port(),
        )
        env["HOME"] = str(self.workdir / "home")
        env["HF_HOME"] = str(self.workdir / "hf")
        env.update(launch.env)
        log = self.workdir / f"worker-{target.key}.log"
        proc = ManagedProcess(launch.argv, env=hermetic_env(env), log_path=log, cwd=REPO)
        proc.start()
        running = RunningTarget(target, launch, proc)
        try:
            self.frontend.wait_for_model(launch.model, timeout=READY_TIMEOUT_S, watch=[proc])
        except BaseException:
            running.stop()
            raise
        return running

    def wait_gone(self, model: str, timeout: float = 30.0) -> None:
        """Wait (bounded) until the frontend no longer lists ``model``."""
        if self.frontend is None:
            return
        deadline = time.monotonic() + timeout
        while model in self.frontend.models() and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        if self.frontend is not None:
            self.frontend.stop()
        self.nats.stop()
        self.etcd.stop()

    def __enter__(self) -> BenchStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

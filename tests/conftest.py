"""Shared fixtures: real services (etcd, NATS, the real Dynamo frontend) and worker processes.

Every service is started by these fixtures on 127.0.0.1 with random ports and
stopped by them, also when a test fails. Tests that need the real frontend are
marked ``e2e``; without it they fail in CI (CI=true) and skip elsewhere.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend_common.devstack.frontend import (
    Frontend,
    find_frontend_python,
    hermetic_env,
    worker_env,
)
from backend_common.devstack.services import EtcdServer, ManagedProcess, NatsServer, free_port
from backend_common.devstack.tinymodel import write_tiny_model

REPO = Path(__file__).resolve().parent.parent
RUNTIME_SRC = REPO / "template" / "src"


def require_frontend() -> str:
    python = find_frontend_python()
    if python is None:
        message = (
            "the real Dynamo 1.6.1 frontend is not installed: run `make frontend` "
            "(or set DYNAMO_FRONTEND_PYTHON)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return python


@pytest.fixture(scope="session")
def frontend_python() -> str:
    return require_frontend()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(log_path=tmp_path_factory.mktemp("nats") / "nats.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Stack:
    """A frontend plus the settings a worker needs to join it."""

    def __init__(
        self,
        frontend: Frontend,
        *,
        discovery: str,
        plane: str,
        etcd_endpoint: str | None,
        nats_url: str | None,
        workdir: Path,
        model_dir: Path,
    ) -> None:
        self.frontend = frontend
        self.discovery = discovery
        self.plane = plane
        self.etcd_endpoint = etcd_endpoint
        self.nats_url = nats_url
        self.workdir = workdir
        self.model_dir = model_dir
        self.workers: list[ManagedProcess] = []

    def worker_env(self, **extra: str) -> dict[str, str]:
        env = worker_env(
            discovery_backend=self.discovery,  # type: ignore[arg-type]
            file_kv=self.frontend.file_kv,
            etcd_endpoint=self.etcd_endpoint,
            nats_url=self.nats_url,
            request_plane=self.plane,  # type: ignore[arg-type]
        )
        env["PYTHONPATH"] = os.pathsep.join([str(RUNTIME_SRC), str(REPO)])
        env["DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS"] = "0.2"
        env["DYN_DEBUG_VALIDATE"] = "1"
        env.update(extra)
        return hermetic_env(env)

    def start_worker(
        self,
        model: str,
        *args: str,
        namespace: str = "dynamo",
        module: str = "tests.e2e_engine",
        system_port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> ManagedProcess:
        """Start a worker process serving ``model`` and return it (not waited for)."""
        extra = dict(env or {})
        if system_port is not None:
            extra["DYN_SYSTEM_PORT"] = str(system_port)
        argv = [sys.executable, "-m", module, "--model-path", str(self.model_dir)]
        argv += ["--model-name", model, "--namespace", namespace, *args]
        log = self.workdir / f"worker-{model}-{len(self.workers)}.log"
        proc = ManagedProcess(argv, env=self.worker_env(**extra), log_path=log, cwd=REPO)
        proc.start()
        self.workers.append(proc)
        return proc

    def serve(self, model: str, *args: str, **kwargs) -> ManagedProcess:
        """Start a worker and wait until the frontend lists its model."""
        proc = self.start_worker(model, *args, **kwargs)
        self.frontend.wait_for_model(model, timeout=60, watch=[proc])
        return proc

    def stop(self) -> None:
        for proc in self.workers:
            proc.terminate(timeout=15)
        self.frontend.stop()


@pytest.fixture
def make_stack(
    tmp_path: Path, tiny_model: Path, frontend_python: str, request: pytest.FixtureRequest
) -> Iterator:
    """``make_stack(discovery, plane)`` starts a frontend; every process is stopped at the end."""
    stacks: list[Stack] = []

    def make(discovery: str = "file", plane: str = "tcp", **frontend_kwargs) -> Stack:
        etcd_endpoint = request.getfixturevalue("etcd").endpoint if discovery == "etcd" else None
        # NATS is needed by the NATS request plane and by the NATS event plane (KV events).
        needs_nats = plane == "nats" or frontend_kwargs.get("event_plane") == "nats"
        nats_url = request.getfixturevalue("nats_server").url if needs_nats else None
        workdir = tmp_path / f"stack{len(stacks)}"
        frontend = Frontend(
            workdir=workdir,
            python=frontend_python,
            discovery_backend=discovery,  # type: ignore[arg-type]
            etcd_endpoint=etcd_endpoint,
            nats_url=nats_url,
            request_plane=plane,  # type: ignore[arg-type]
            **frontend_kwargs,
        )
        stack = Stack(
            frontend,
            discovery=discovery,
            plane=plane,
            etcd_endpoint=etcd_endpoint,
            nats_url=nats_url,
            workdir=workdir,
            model_dir=tiny_model,
        )
        stacks.append(stack)
        frontend.start()
        return stack

    try:
        yield make
    finally:
        for stack in stacks:
            stack.stop()


def wait_until(predicate, timeout: float, interval: float = 0.05, message: str = "") -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    pytest.fail(message or f"condition not met within {timeout}s")


__all__ = ["Stack", "free_port", "require_frontend", "wait_until"]

"""End to end: the real Dynamo 1.6.1 frontend serves OpenAI chat requests from this backend.

Needs the frontend's own virtual environment: ``make test`` (and ``make e2e``) install it
into ``.venv-dynamo`` on first use (scripts/install-dynamo-frontend.sh) unless
``DYNAMO_FRONTEND_PYTHON`` points at another one. A bare ``pytest`` without either skips
these tests and says so; ``make test`` never does. Everything runs on 127.0.0.1 on free
ports: file discovery in a temporary directory, the project's default request plane
(tcp), and a tiny model written by
``backend_common.devstack``.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from backend_common.devstack.frontend import (
    Frontend,
    find_frontend_python,
    hermetic_env,
    worker_env,
)
from backend_common.devstack.openai import chat, completion
from backend_common.devstack.services import ManagedProcess, NatsServer, free_port
from backend_common.devstack.tinyllm import write_tiny_llama as write_model

from vllm_cpu_backend.args import DEFAULT_REQUEST_PLANE

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
MODEL = "tiny"
READY_TIMEOUT_S = 240.0

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        find_frontend_python() is None,
        reason="the real Dynamo frontend is not installed: run `make e2e` "
        "(or set DYNAMO_FRONTEND_PYTHON to its venv's python)",
    ),
]


class Stack:
    def __init__(self, frontend: Frontend, workers: list[ManagedProcess], ports: list[int]) -> None:
        self.frontend = frontend
        self.workers = workers
        self.system_ports = ports

    @property
    def worker(self) -> ManagedProcess:
        return self.workers[0]

    def logs(self) -> str:
        tails = [f"--- frontend log tail ---\n{self.frontend.log_tail()}"]
        for n, worker in enumerate(self.workers):
            tails.append(f"--- worker {n} log tail ---\n{worker.log_tail()}")
        return "\n".join(tails)


def start_stack(tmp_path: Path, *roles: tuple[str, ...]) -> Iterator[Stack]:
    """Frontend + one worker per entry of ``roles`` (its extra flags); stops all at the end."""
    model_path = write_model(tmp_path / "model")
    nats = None
    if DEFAULT_REQUEST_PLANE == "nats":
        nats = NatsServer(log_path=tmp_path / "nats.log").start()
    nats_url = nats.url if nats is not None else None
    frontend = Frontend(
        workdir=tmp_path / "frontend",
        discovery_backend="file",
        request_plane=DEFAULT_REQUEST_PLANE,
        nats_url=nats_url,
    )
    workers: list[ManagedProcess] = []
    ports: list[int] = []
    for n, role_args in enumerate(roles):
        ports.append(free_port())
        env = worker_env(
            discovery_backend="file",
            file_kv=frontend.file_kv,
            request_plane=DEFAULT_REQUEST_PLANE,
            nats_url=nats_url,
            system_port=ports[-1],
        )
        workers.append(
            ManagedProcess(
                [sys.executable, "-m", "vllm_cpu_backend", "--model-path", str(model_path)]
                + ["--model-name", MODEL, "--discovery-backend", "file", *role_args]
                + ["--enforce-eager", "--dtype", "float32", "--max-model-len", "512"],
                env=hermetic_env({**env, "PYTHONPATH": str(SRC), "VLLM_CPU_KVCACHE_SPACE": "1"}),
                log_path=tmp_path / f"worker{n}.log",
            )
        )
    try:
        frontend.start()
        for worker in workers:
            worker.start()
        stack = Stack(frontend, workers, ports)
        try:
            frontend.wait_for_model(MODEL, timeout=READY_TIMEOUT_S, watch=workers)
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}\n{stack.logs()}") from exc
        yield stack
    finally:
        for worker in workers:
            worker.terminate()
        frontend.stop()
        if nats is not None:
            nats.stop()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    yield from start_stack(tmp_path, ())


async def test_chat_request_streams_through_the_real_frontend(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        result = await chat(
            session, stack.frontend.base_url, MODEL, "hello", max_tokens=8, stream=True
        )
    assert result.ok, f"{result.status} {result.error}\n{stack.logs()}"
    assert result.text.strip(), stack.logs()
    assert result.finish_reason in ("stop", "length")
    assert result.usage is not None and 0 < result.usage["completion_tokens"] <= 8


async def test_non_streaming_chat_request(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        result = await chat(
            session, stack.frontend.base_url, MODEL, "hello", max_tokens=4, stream=False
        )
    assert result.ok, f"{result.status} {result.error}\n{stack.logs()}"
    assert result.text.strip()
    assert result.finish_reason in ("stop", "length")


@pytest.mark.parametrize("stream", [True, False])
async def test_completions_request(stack: Stack, stream: bool) -> None:
    async with aiohttp.ClientSession() as session:
        result = await completion(
            session, stack.frontend.base_url, MODEL, "w1 w2 w3", max_tokens=4, stream=stream
        )
    assert result.ok, f"{result.status} {result.error}\n{stack.logs()}"
    assert result.text.strip()
    assert result.finish_reason in ("stop", "length")


def test_worker_stops_cleanly_and_leaves_discovery(stack: Stack) -> None:
    assert stack.worker.terminate(timeout=30) == 0, stack.logs()
    stack.frontend.wait_model_gone(MODEL, timeout=30)


async def test_make_run_starts_a_serving_stack(tmp_path: Path) -> None:
    """``scripts/run_local.py`` (``make run``) starts the frontend and the worker(s), and serves."""
    port = free_port()
    run_log = tmp_path / "run.log"
    run = ManagedProcess(
        [sys.executable, str(ROOT / "scripts" / "run_local.py"), "--http-port", str(port)],
        env=hermetic_env(
            {
                "PYTHONPATH": str(SRC),
                "DYNAMO_FRONTEND_PYTHON": find_frontend_python() or "",
                "PYTHONUNBUFFERED": "1",
            }
        ),
        log_path=run_log,
        cwd=tmp_path,
    ).start()
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "Ready." not in run_log.read_text():
            assert run.running, run.log_tail()
            assert time.monotonic() < deadline, run.log_tail()
            await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as session:
            result = await chat(
                session, f"http://127.0.0.1:{port}", MODEL, "hello", max_tokens=4, stream=False
            )
        assert result.ok, f"{result.status} {result.error}\n{run.log_tail()}"
    finally:
        # SIGINT is Ctrl-C: the script stops every process it started, then exits.
        run.send_signal(signal.SIGINT)
        try:
            run.wait(timeout=60)
        finally:
            run.kill()

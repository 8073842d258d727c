"""End to end: the real Dynamo 1.6.1 frontend serves OpenAI chat requests from this backend.

Needs the frontend's own virtual environment: ``make e2e`` installs it into ``.venv-dynamo``
(scripts/install-dynamo-frontend.sh) and runs this file; ``DYNAMO_FRONTEND_PYTHON`` may
point at another one. Without it the tests are skipped and say so. Everything runs on
127.0.0.1 on free ports: file discovery in a temporary directory, the project's default
request plane (tcp),
and a tiny model written by ``backend_common.devstack`` (random weights).
"""

from __future__ import annotations

import sys
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
from backend_common.devstack.tinyllm import write_tiny_causal_lm as write_model

from transformers_cpu.args import DEFAULT_REQUEST_PLANE

SRC = Path(__file__).resolve().parent.parent / "src"
MODEL = "tiny"
READY_TIMEOUT_S = 90.0

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        find_frontend_python() is None,
        reason="the real Dynamo frontend is not installed: run `make e2e` "
        "(or set DYNAMO_FRONTEND_PYTHON to its venv's python)",
    ),
]


class Stack:
    def __init__(self, frontend: Frontend, worker: ManagedProcess) -> None:
        self.frontend = frontend
        self.worker = worker

    def logs(self) -> str:
        return (
            f"--- frontend log tail ---\n{self.frontend.log_tail()}\n"
            f"--- worker log tail ---\n{self.worker.log_tail()}"
        )


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
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
    env = worker_env(
        discovery_backend="file",
        file_kv=frontend.file_kv,
        request_plane=DEFAULT_REQUEST_PLANE,
        nats_url=nats_url,
        system_port=free_port(),
    )
    worker = ManagedProcess(
        [sys.executable, "-m", "transformers_cpu", "--model-path", str(model_path)]
        + ["--model-name", MODEL, "--discovery-backend", "file"],
        env=hermetic_env({**env, "PYTHONPATH": str(SRC)}),
        log_path=tmp_path / "worker.log",
    )
    try:
        frontend.start()
        worker.start()
        stack = Stack(frontend, worker)
        try:
            frontend.wait_for_model(MODEL, timeout=READY_TIMEOUT_S)
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}\n{stack.logs()}") from exc
        yield stack
    finally:
        worker.terminate()
        frontend.stop()
        if nats is not None:
            nats.stop()


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

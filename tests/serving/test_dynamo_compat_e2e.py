"""Engines written for Dynamo 1.6.1's Python backend interface, behind the real 1.6.1 frontend.

Three engines, the same cases (chat and completions, streaming and not, a client that
disconnects mid-stream):

* ``dynamo-sample``: Dynamo 1.6.1's own ``sample_engine.py``, loaded unmodified from the
  frontend venv's wheel by ``backend_common.dynamo_compat.launch`` (its ``dynamo.*`` imports
  resolved to the compatibility package) in this repository's ``.venv``, with its own
  defaults (etcd discovery, TCP request plane) and flags;
* ``dynamo-style-skeleton``: the template's skeleton engine rewritten in the 1.6.1 style
  (``tests/dynamo_style_skeleton.py``), which imports ``backend_common.dynamo_compat``;
* ``native-skeleton``: the generated skeleton engine itself (``examples/skeleton-cpu``), the
  baseline the other two must match.

Every engine emits token ids 1, 2, 3, ..., which the tiny model's tokenizer spells ``w1 w2 w3``.
Last, the sample engine as a prefill and a decode worker behind the frontend's prefill router,
and the prefill worker's drain through ``is_quiescent`` on SIGTERM.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import REPO, Stack, free_port, wait_until
from dynamo_wheel import SAMPLE_ENGINE, backend_dir
from worker_probes import events, scrape, words

from backend_common.devstack.openai import chat, completion
from backend_common.devstack.services import ManagedProcess

pytestmark = pytest.mark.e2e

ENGINES = ["dynamo-sample", "dynamo-style-skeleton", "native-skeleton"]
SKELETON_SRC = REPO / "examples" / "skeleton-cpu" / "src"
DELAY_S = "0.02"
CANCEL_MAX_TOKENS = 1000  # 20 s of tokens at DELAY_S: a stream that was not cancelled shows
CANCEL_RELEASE_S = 10.0
PREFILL_DRAIN_S = 1.0


@pytest.fixture(scope="module")
def dynamo_backend_dir(frontend_python: str) -> Path:
    return backend_dir(frontend_python)


def _start(stack: Stack, kind: str, backend_dir: Path, port: int) -> tuple[ManagedProcess, str]:
    """Start one worker of ``kind``; return it and the model name the frontend lists."""
    model_dir = str(stack.model_dir)
    env = stack.worker_env(DYN_SYSTEM_PORT=str(port))
    if kind == "dynamo-sample":
        # The sample's only model flag is --model-name, which is also its served name.
        argv = ["-m", "backend_common.dynamo_compat.launch", "--source-dir", str(backend_dir)]
        argv += [SAMPLE_ENGINE, "--model-name", model_dir, "--delay", DELAY_S]
        model = model_dir
    elif kind == "dynamo-style-skeleton":
        argv = ["-m", "tests.dynamo_style_skeleton", "--model-name", model_dir]
        argv += ["--served-model-name", "compat-skeleton", "--delay", DELAY_S]
        model = "compat-skeleton"
    else:
        env["PYTHONPATH"] = f"{env['PYTHONPATH']}:{SKELETON_SRC}"
        argv = ["-m", "skeleton_cpu", "--model-path", model_dir, "--model-name", "native"]
        argv += ["--discovery-backend", "etcd", "--delay", DELAY_S]
        model = "native"
    log = stack.workdir / f"worker-{kind}.log"
    proc = ManagedProcess([sys.executable, *argv], env=env, log_path=log, cwd=REPO)
    proc.start()
    stack.workers.append(proc)
    stack.frontend.wait_for_model(model, timeout=90, watch=[proc])
    return proc, model


@pytest.fixture(params=ENGINES)
def served(request, make_stack, dynamo_backend_dir):
    stack: Stack = make_stack("etcd", "tcp")
    port = free_port()
    proc, model = _start(stack, request.param, dynamo_backend_dir, port)
    return stack, proc, model, port, request.param


@pytest.mark.parametrize("stream", [True, False])
async def test_chat(served, stream: bool) -> None:
    stack, proc, model, _, _ = served
    async with aiohttp.ClientSession() as session:
        result = await chat(
            session, stack.frontend.base_url, model, "w3", max_tokens=8, stream=stream
        )
    assert result.status == 200, (result.error, proc.log_tail())
    assert result.error is None
    assert result.text.split() == words(8).split()
    assert result.finish_reason == "length"
    assert result.usage is not None and result.usage["completion_tokens"] == 8


@pytest.mark.parametrize("stream", [True, False])
async def test_completions(served, stream: bool) -> None:
    stack, proc, model, _, _ = served
    async with aiohttp.ClientSession() as session:
        result = await completion(
            session, stack.frontend.base_url, model, "w1 w2 w3", max_tokens=4, stream=stream
        )
    assert result.status == 200, (result.error, proc.log_tail())
    assert result.text.split() == words(4).split()
    assert result.finish_reason == "length"


async def test_client_disconnect_cancels_the_stream(served) -> None:
    stack, proc, model, port, kind = served
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "w1 w2"}],
        "max_tokens": CANCEL_MAX_TOKENS,
        "stream": True,
    }
    url = f"{stack.frontend.base_url}/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            assert resp.status == 200
            seen = 0
            async for line in resp.content:
                seen += line.startswith(b"data: {")
                if seen >= 3:
                    break
            assert scrape(port)["dynamo_component_inflight_requests"] == 1
    # Leaving the block closed the connection mid-stream.
    wait_until(
        lambda: scrape(port)["dynamo_component_inflight_requests"] == 0,
        CANCEL_RELEASE_S,
        message=f"{kind}: the stream kept running after the client left",
    )
    if kind == "dynamo-style-skeleton":
        # The 1.6.1 abort hook ran once, for the cancelled request only.
        wait_until(lambda: len(events(proc, "abort")) == 1, 5, message="abort() not called")
    async with aiohttp.ClientSession() as session:
        after = await chat(session, stack.frontend.base_url, model, "w1", max_tokens=3, stream=True)
    assert after.status == 200 and after.finish_reason == "length"


async def test_sample_engine_prefill_and_decode_serve_chat_and_prefill_drains(
    make_stack, dynamo_backend_dir
) -> None:
    """1.6.1's sample engine in both disaggregated roles behind the frontend's prefill router.

    The decode role raises when a request lacks ``prefill_result`` (``require_prefill_result``),
    so a served request shows the prefill worker's ``disaggregated_params`` reached it. On
    SIGTERM the prefill worker polls the sample's ``is_quiescent`` (it cannot tell: ``None``)
    for ``DYN_PREFILL_DRAIN_TIMEOUT_S`` and then exits cleanly.
    """
    stack: Stack = make_stack("etcd", "tcp")
    model_dir = str(stack.model_dir)
    launch = ["-m", "backend_common.dynamo_compat.launch", "--source-dir", str(dynamo_backend_dir)]
    launch += [SAMPLE_ENGINE, "--model-name", model_dir, "--delay", DELAY_S]
    roles = {"prefill": ["--component", "prefill"], "decode": []}
    procs = {}
    for role, extra in roles.items():
        env = stack.worker_env(DYN_PREFILL_DRAIN_TIMEOUT_S=str(PREFILL_DRAIN_S))
        argv = [sys.executable, *launch, "--disaggregation-mode", role, *extra]
        log = stack.workdir / f"worker-sample-{role}.log"
        procs[role] = ManagedProcess(argv, env=env, log_path=log, cwd=REPO)
        procs[role].start()
        stack.workers.append(procs[role])
    stack.frontend.wait_for_model(model_dir, timeout=90, watch=list(procs.values()))
    wait_until(
        lambda: "Prefill worker detected" in stack.frontend.log_text(),
        30,
        message="the frontend never found the prefill worker",
    )
    async with aiohttp.ClientSession() as session:
        for stream in (False, True):
            result = await chat(
                session, stack.frontend.base_url, model_dir, "w1 w2 w3", max_tokens=5, stream=stream
            )
            assert result.status == 200, (result.error, procs["decode"].log_tail())
            assert result.usage is not None and result.usage["completion_tokens"] == 5
            assert result.text.strip()
    started = time.monotonic()
    assert procs["prefill"].terminate(timeout=PREFILL_DRAIN_S + 20) == 0
    assert time.monotonic() - started >= PREFILL_DRAIN_S
    log = procs["prefill"].log_path.read_text(errors="replace")
    assert "drain: waiting for prefill to quiesce" in log
    assert f"drain: timed out at {PREFILL_DRAIN_S:.1f}s" in log

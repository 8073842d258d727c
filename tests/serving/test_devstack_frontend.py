"""devstack: tiny model, OpenAI client and the REAL Dynamo 1.6.1 frontend + sample backend.

The e2e part starts the real ``dynamo.frontend`` with FILE discovery (no etcd, no NATS)
and the real ``dynamo.common.backend.sample_main`` on 127.0.0.1, and checks what a client
sees. Without a frontend venv the e2e tests skip, except in CI (``CI=true``) where they fail.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import require_frontend
from tokenizers import Tokenizer

from backend_common.devstack.frontend import (
    Frontend,
    find_frontend_python,
    free_system_port,
    hermetic_env,
    worker_env,
)
from backend_common.devstack.openai import chat, completion
from backend_common.devstack.services import ManagedProcess, ServiceError, free_port
from backend_common.devstack.tinymodel import write_tiny_model

# ---------------------------------------------------------------- tiny model (no frontend)


def test_tiny_model_vocabulary_and_files(tmp_path: Path) -> None:
    out = write_tiny_model(tmp_path / "m")
    assert out.is_absolute()
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == 2051
    assert [tok.id_to_token(i) for i in (0, 1, 1000, 1999, 2047)] == [
        "w0",
        "w1",
        "w1000",
        "w1999",
        "w2047",
    ]
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [2048, 2049, 2050]
    assert tok.encode("w1 w2 hello w2047").ids == [1, 2, 2048, 2047]
    assert tok.decode([1, 2, 3]) == "w1 w2 w3"
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" in tcfg and tcfg["eos_token"] == "</s>"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] and cfg["model_type"] and cfg["max_position_embeddings"] == 2048
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2050


def test_tiny_model_options_and_cli(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2048"):
        write_tiny_model(tmp_path / "small", words=100)
    run = subprocess.run(
        [sys.executable, "-m", "backend_common.devstack.tinymodel", str(tmp_path / "cli")]
        + ["--words", "3000", "--context-length", "512"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "template" / "src")},
    )
    assert run.returncode == 0, run.stderr
    tok = Tokenizer.from_file(str(tmp_path / "cli" / "tokenizer.json"))
    assert tok.token_to_id("w2999") == 2999 and tok.token_to_id("</s>") == 3002
    cfg = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 512


# ------------------------------------------------- OpenAI client against a scripted server


async def _scripted_server(
    pieces: list[bytes], status: int = 200, ctype: str = ""
) -> web.AppRunner:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.json()
        if ctype != "text/event-stream":
            return web.Response(status=status, body=b"".join(pieces), content_type=ctype)
        resp = web.StreamResponse(status=status, headers={"Content-Type": ctype})
        await resp.prepare(request)
        for p in pieces:  # one write per piece: the parser must re-split across reads
            await resp.write(p)
            await asyncio.sleep(0.001)
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    return runner


async def _serve(runner: web.AppRunner) -> str:
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return f"http://127.0.0.1:{port}"


async def test_sse_parser_handles_split_lines_crlf_comments_error_and_done() -> None:
    ev = [
        b": keep-alive comment\r\n\r\n",
        b'data: {"model":"m","choices":[{"index":0,"delta":{"content":" w1"}}]}\r\n\r\nda',
        b'ta: {"choices":[{"index":0,"delta":{"content":" w2"},"finish_reason":null}]}\n\n',
        b'data: {"error":{"message":"Request cancelled","type":"request_cancelled",'
        b'"code":499}}\n\n',
        b"data: [DONE]\n\n",
    ]
    runner = await _scripted_server(ev, ctype="text/event-stream")
    try:
        base = await _serve(runner)
        async with aiohttp.ClientSession() as s:
            r = await chat(s, base, "m", "hi", max_tokens=2, stream=True, timeout=10)
    finally:
        await runner.cleanup()
    assert r.status == 200 and not r.ok
    assert r.text == " w1 w2" and r.model == "m"
    assert r.error == {"message": "Request cancelled", "type": "request_cancelled", "code": 499}
    assert r.finish_reason is None and r.usage is None
    assert r.done and r.chunks == 3
    assert r.ttft_s is not None and len(r.itl) == 1


async def test_client_reports_http_errors_and_completion_text() -> None:
    err = [b'{"message":"Model not found","type":"Not Found","code":404}']
    runner = await _scripted_server(err, status=404, ctype="application/json")
    try:
        base = await _serve(runner)
        async with aiohttp.ClientSession() as s:
            r = await completion(s, base, "x", "w1", max_tokens=1, stream=True, timeout=10)
    finally:
        await runner.cleanup()
    assert r.status == 404 and r.error is not None and r.error["message"] == "Model not found"
    assert r.text == "" and not r.done

    body = [b'{"model":"m","choices":[{"index":0,"text":" w1 w2","finish_reason":"length"}],']
    body.append(b'"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}')
    runner = await _scripted_server(body, ctype="application/json")
    try:
        base = await _serve(runner)
        async with aiohttp.ClientSession() as s:
            r = await completion(s, base, "m", "w1", max_tokens=2, stream=False, timeout=10)
    finally:
        await runner.cleanup()
    assert r.ok and r.text == " w1 w2" and r.finish_reason == "length"
    assert r.usage == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


async def test_client_timeout_is_bounded() -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await asyncio.wait_for(release.wait(), 10)
        return web.Response(text="{}")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        base = await _serve(runner)
        async with aiohttp.ClientSession() as s:
            with pytest.raises(TimeoutError, match="within 0.3 s"):
                await chat(s, base, "m", "hi", max_tokens=1, stream=False, timeout=0.3)
    finally:
        release.set()
        await runner.cleanup()


def test_worker_env_is_loopback_and_validates() -> None:
    env = worker_env(discovery_backend="file", file_kv="/tmp/kv", system_port=9999)
    assert env["DYN_DISCOVERY_BACKEND"] == "file" and env["DYN_FILE_KV"] == "/tmp/kv"
    assert env["DYN_TCP_RPC_HOST"] == env["DYN_SYSTEM_HOST"] == "127.0.0.1"
    assert env["DYN_SYSTEM_PORT"] == "9999" and env["DYN_REQUEST_PLANE"] == "tcp"
    assert "NATS_SERVER" not in env and "ETCD_ENDPOINTS" not in env
    env = worker_env(
        discovery_backend="etcd",
        etcd_endpoint="http://127.0.0.1:1",
        nats_url="nats://127.0.0.1:2",
        request_plane="nats",
    )
    assert env["ETCD_ENDPOINTS"] == "http://127.0.0.1:1" and env["NATS_SERVER"].endswith(":2")
    with pytest.raises(ValueError, match="file_kv"):
        worker_env(discovery_backend="file")
    with pytest.raises(ValueError, match="system_port"):
        worker_env(discovery_backend="file", file_kv="/x", system_port=70000)
    assert 20000 <= free_system_port() <= 32767  # real Dynamo parses DYN_SYSTEM_PORT as i16
    with pytest.raises(ValueError, match="nats_url"):
        worker_env(discovery_backend="file", file_kv="/x", request_plane="nats")


def test_hermetic_env_drops_stack_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_SERVER", "nats://10.0.0.1:4222")
    monkeypatch.setenv("DYN_NAMESPACE", "leaked")
    env = hermetic_env({"DYN_REQUEST_PLANE": "tcp"})
    assert "NATS_SERVER" not in env and "DYN_NAMESPACE" not in env
    assert env["DYN_REQUEST_PLANE"] == "tcp" and env["PATH"] == os.environ["PATH"]


def test_find_frontend_python(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DYNAMO_FRONTEND_PYTHON", raising=False)
    py = tmp_path / ".venv-dynamo" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text("#!/bin/sh\n")
    py.chmod(0o755)
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert find_frontend_python() == str(py)
    monkeypatch.setenv("DYNAMO_FRONTEND_PYTHON", str(tmp_path / "missing"))
    assert find_frontend_python() is None


# ----------------------------------------------------------------- real frontend (e2e)


def _listening(pid: int) -> list[str]:
    """``ip:port`` of every TCP socket in LISTEN state held by ``pid`` (read from /proc)."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, width in (("tcp", 4), ("tcp6", 16)):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                continue
            hex_ip, hex_port = cols[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # The kernel prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
            found.append(f"{ipaddress.ip_address(raw)}:{int(hex_port, 16)}")
    return found


@dataclass
class Stack:
    frontend: Frontend
    python: str
    file_kv: Path
    model: str
    worker: ManagedProcess
    tmp: Path


def _start_sample_worker(
    stack_python: str, file_kv: Path, model_dir: Path, namespace: str, log: Path
) -> ManagedProcess:
    env = hermetic_env(
        worker_env(discovery_backend="file", file_kv=file_kv, system_port=free_system_port())
    )
    env.update(HOME=str(log.parent / "home"), HF_HOME=str(log.parent / "hf"))
    argv = [stack_python, "-m", "dynamo.common.backend.sample_main", "--model-name", str(model_dir)]
    argv += ["--namespace", namespace, "--discovery-backend", "file"]
    argv += ["--disable-kv-routing", "--delay", "0"]
    return ManagedProcess(argv, env=env, log_path=log, cwd=log.parent).start()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    python = require_frontend()
    tmp = tmp_path_factory.mktemp("devstack")
    model_dir = write_tiny_model(tmp / "tiny-model")
    fe = Frontend(python=python, workdir=tmp / "fe", discovery_backend="file")
    worker: ManagedProcess | None = None
    try:
        fe.start()
        assert fe.file_kv is not None
        worker = _start_sample_worker(python, fe.file_kv, model_dir, "dynamo", tmp / "worker.log")
        try:
            fe.wait_for_model(str(model_dir), timeout=60, watch=[worker])
        except (TimeoutError, ServiceError) as exc:
            raise AssertionError(f"{exc}\nworker log:\n{worker.log_tail()}") from exc
        yield Stack(fe, python, fe.file_kv, str(model_dir), worker, tmp)
    finally:
        if worker is not None:
            worker.terminate(15)
        fe.stop()


@pytest.mark.e2e
def test_model_listed_and_everything_on_loopback(stack: Stack) -> None:
    assert stack.model in stack.frontend.models()
    info = stack.frontend.model_info(stack.model)
    assert info is not None and info.get("context_window") == 2048
    for pid in (stack.frontend.pid, stack.worker.pid):
        assert pid is not None
        addrs = _listening(pid)
        assert addrs, f"pid {pid} listens on nothing"
        assert all(a.startswith("127.0.0.1:") for a in addrs), addrs
    assert f"127.0.0.1:{stack.frontend.port}" in _listening(stack.frontend.pid)


@pytest.mark.e2e
async def test_chat_non_streaming(stack: Stack) -> None:
    async with aiohttp.ClientSession() as s:
        r = await chat(
            s,
            stack.frontend.base_url,
            stack.model,
            "w5 w6 hello",
            max_tokens=8,
            stream=False,
            timeout=30,
        )
    assert r.ok, r
    assert r.text == " w1 w2 w3 w4 w5 w6 w7 w8"
    assert r.finish_reason == "length" and r.model == stack.model
    assert r.usage is not None and r.usage["completion_tokens"] == 8
    assert r.usage["total_tokens"] == r.usage["prompt_tokens"] + 8


@pytest.mark.e2e
async def test_chat_streaming_with_usage(stack: Stack) -> None:
    async with aiohttp.ClientSession() as s:
        r = await chat(
            s, stack.frontend.base_url, stack.model, "w5 w6", max_tokens=3, stream=True, timeout=30
        )
    assert r.ok, r
    assert r.text == " w1 w2 w3" and r.finish_reason == "length" and r.done
    assert r.chunks >= 4  # three token chunks and the usage chunk
    assert r.usage is not None and r.usage["completion_tokens"] == 3
    assert len(r.itl) == 2 and r.ttft_s is not None


@pytest.mark.e2e
@pytest.mark.parametrize("stream", [False, True])
async def test_completions(stack: Stack, stream: bool) -> None:
    async with aiohttp.ClientSession() as s:
        r = await completion(
            s,
            stack.frontend.base_url,
            stack.model,
            "w10 w11 w2047",
            max_tokens=6,
            stream=stream,
            timeout=30,
        )
    assert r.ok, r
    assert r.text == " w1 w2 w3 w4 w5 w6" and r.finish_reason == "length"
    u = r.usage or {}
    assert (u.get("prompt_tokens"), u.get("completion_tokens"), u.get("total_tokens")) == (3, 6, 9)


@pytest.mark.e2e
async def test_unknown_model_is_404(stack: Stack) -> None:
    async with aiohttp.ClientSession() as s:
        r = await chat(
            s,
            stack.frontend.base_url,
            "no-such-model",
            "w1",
            max_tokens=2,
            stream=False,
            timeout=30,
        )
    assert r.status == 404
    assert r.error is not None and "not found" in str(r.error.get("message", "")).lower()


@pytest.mark.e2e
async def test_stopped_worker_model_disappears(stack: Stack) -> None:
    model_b = write_tiny_model(stack.tmp / "tiny-model-b")
    log = stack.tmp / "worker-b" / "worker.log"
    log.parent.mkdir()
    worker = _start_sample_worker(stack.python, stack.file_kv, model_b, "devstack-b", log)
    try:
        try:
            await asyncio.to_thread(stack.frontend.wait_for_model, str(model_b), 60, watch=[worker])
        except (TimeoutError, ServiceError) as exc:
            raise AssertionError(f"{exc}\nworker log:\n{worker.log_tail()}") from exc
        async with aiohttp.ClientSession() as s:
            r = await chat(
                s,
                stack.frontend.base_url,
                str(model_b),
                "w1",
                max_tokens=2,
                stream=False,
                timeout=30,
            )
        assert r.ok and r.text == " w1 w2", r
        # SIGTERM: the worker deregisters at once, then drains for its 5 s grace period.
        worker.send_signal(15)
        await asyncio.to_thread(stack.frontend.wait_model_gone, str(model_b), 20)
        assert stack.model in stack.frontend.models()  # the other worker is untouched
        assert await asyncio.to_thread(worker.wait, 15) is not None
    finally:
        worker.terminate(15)

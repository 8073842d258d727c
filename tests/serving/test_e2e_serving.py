"""A backend built on backend_common, served by the real Dynamo 1.6.1 frontend.

Each test starts the frontend and worker processes it needs (loopback, random
ports) and stops them at the end. The worker runs ``tests.e2e_engine``: the
reference engine (tokens 1, 2, 3, ... -> " w1 w2 w3 ...") plus observable
abort/release/cleanup events.
"""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest
from conftest import Stack, free_port, wait_until
from worker_probes import events, scrape, words

from backend_common.devstack.openai import chat, completion

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("discovery", "plane"), [("file", "tcp"), ("etcd", "tcp"), ("etcd", "nats")]
)
async def test_openai_surface(make_stack, discovery: str, plane: str) -> None:
    stack: Stack = make_stack(discovery, plane)
    model = f"tiny-{discovery}-{plane}"
    stack.serve(model)
    assert model in stack.frontend.models()
    base = stack.frontend.base_url
    async with aiohttp.ClientSession() as session:
        full = await chat(session, base, model, "w5 w6", max_tokens=8, stream=False)
        assert full.status == 200, full.error
        assert full.text.strip() == words(8).strip()
        assert full.finish_reason == "length"
        assert full.usage["completion_tokens"] == 8
        assert full.usage["prompt_tokens"] > 0

        streamed = await chat(session, base, model, "w5 w6", max_tokens=5, stream=True)
        assert streamed.status == 200, streamed.error
        assert streamed.text.strip() == words(5).strip()
        assert streamed.finish_reason == "length"
        assert streamed.usage["completion_tokens"] == 5
        assert streamed.done

        comp = await completion(session, base, model, "w10 w11", max_tokens=6, stream=False)
        assert comp.status == 200, comp.error
        assert comp.text.strip() == words(6).strip()
        assert comp.usage == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}

        comp_stream = await completion(session, base, model, "w10", max_tokens=3, stream=True)
        assert comp_stream.status == 200, comp_stream.error
        assert comp_stream.text.strip() == words(3).strip()
        assert comp_stream.finish_reason == "length"

        default = await chat(session, base, model, "w1", max_tokens=None, stream=False)
        assert default.status == 200, default.error
        assert default.usage["completion_tokens"] == 16  # the engine's default max_tokens

        missing = await chat(session, base, "no-such-model", "w1", max_tokens=2, stream=False)
        assert missing.status == 404


async def test_msgpack_request_plane_codec(make_stack) -> None:
    """A worker advertising msgpack (as Dynamo's Rust workers do) gets msgpack bodies."""
    stack: Stack = make_stack("file", "tcp")
    stack.serve("tiny-msgpack", env={"DYN_REQUEST_PLANE_CODEC": "msgpack"})
    record = next((stack.frontend.file_kv / "v1" / "instances").iterdir()).read_text()
    assert '"request_plane_codec":"msgpack"' in record.replace(" ", "")
    base = stack.frontend.base_url
    async with aiohttp.ClientSession() as session:
        for stream in (False, True):
            result = await chat(session, base, "tiny-msgpack", "w3", max_tokens=5, stream=stream)
            assert result.status == 200, result.error
            assert result.text.strip() == words(5).strip()
            assert result.usage["completion_tokens"] == 5


async def test_client_disconnect_cancels_and_releases(make_stack) -> None:
    stack: Stack = make_stack("file", "tcp")
    port = free_port()
    proc = stack.serve("tiny-cancel", "--delay", "0.02", system_port=port)
    body = {
        "model": "tiny-cancel",
        "messages": [{"role": "user", "content": "w1 w2"}],
        "max_tokens": 1000,
        "stream": True,
    }
    url = f"{stack.frontend.base_url}/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            assert resp.status == 200
            seen = 0
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    seen += 1
                if seen >= 3:
                    break
            assert scrape(port)["dynamo_component_inflight_requests"] == 1
        # Leaving the block closes the connection mid-stream: the client is gone.
    wait_until(
        lambda: scrape(port)["dynamo_component_inflight_requests"] == 0,
        10,
        message="the worker still counts the request as in flight",
    )
    metrics = scrape(port)
    assert metrics["e2e_engine_guarded_requests"] == 0
    wait_until(lambda: len(events(proc, "release")) == 1, 5, message="guard not released")
    assert len(events(proc, "abort")) == 1
    assert events(proc, "abort") == events(proc, "release")

    # A request that finishes on its own is never aborted.
    async with aiohttp.ClientSession() as session:
        done = await chat(
            session, stack.frontend.base_url, "tiny-cancel", "w1", max_tokens=3, stream=True
        )
    assert done.finish_reason == "length"
    wait_until(lambda: len(events(proc, "release")) == 2, 5, message="guard not released")
    assert len(events(proc, "abort")) == 1


async def test_invalid_argument_is_http_400_and_worker_keeps_serving(make_stack) -> None:
    stack: Stack = make_stack("file", "tcp")
    stack.serve("tiny-invalid")
    base = stack.frontend.base_url
    async with aiohttp.ClientSession() as session:
        for stream in (False, True):
            bad = await chat(session, base, "tiny-invalid", "w7", max_tokens=4, stream=stream)
            assert bad.status == 400, (bad.status, bad.error)
            # The 1.6.1 frontend answers typed client errors with its own generic text.
            assert bad.error and bad.error.get("code") == 400
            good = await chat(session, base, "tiny-invalid", "w8", max_tokens=4, stream=stream)
            assert good.status == 200, good.error
            assert good.text.strip() == words(4).strip()


async def test_sigterm_drains_in_flight_streams(make_stack) -> None:
    stack: Stack = make_stack("etcd", "tcp")
    proc = stack.serve("tiny-drain", "--delay", "0.02")
    base = stack.frontend.base_url
    async with aiohttp.ClientSession() as session:
        streams = [
            asyncio.create_task(
                chat(session, base, "tiny-drain", "w1", max_tokens=100, stream=True, timeout=30)
            )
            for _ in range(6)
        ]
        await asyncio.sleep(0.5)  # every stream is now mid-flight (100 tokens take ~2 s)
        proc.send_signal(signal.SIGTERM)
        # The worker leaves discovery at once: the frontend stops listing the model.
        await asyncio.to_thread(stack.frontend.wait_model_gone, "tiny-drain", 3.0)
        results = await asyncio.gather(*streams)
    for result in results:
        assert result.status == 200
        assert result.error is None, result.error
        assert result.finish_reason == "length"
        assert result.text.strip() == words(100).strip()
    assert proc.wait(timeout=15) == 0
    assert len(events(proc, "cleanup")) == 1
    assert "Engine cleanup complete" in proc.log_path.read_text()


async def test_kill_9_then_lease_expiry_and_restart(make_stack) -> None:
    stack: Stack = make_stack("etcd", "tcp")
    ttl = {"ETCD_LEASE_TTL": "3"}
    proc = stack.serve("tiny-kill", env=ttl)
    proc.kill()
    # The dead worker's keys live until its lease expires; then the model is gone.
    await asyncio.to_thread(stack.frontend.wait_model_gone, "tiny-kill", 3 + 7)
    stack.serve("tiny-kill", env=ttl)
    async with aiohttp.ClientSession() as session:
        again = await chat(
            session, stack.frontend.base_url, "tiny-kill", "w1", max_tokens=3, stream=False
        )
    assert again.status == 200, again.error
    assert again.text.strip() == words(3).strip()

"""Reliability under faults: misbehaving engines, hostile and bad requests on a live worker.

Every test runs the real Dynamo 1.6.1 frontend and real worker processes
(``tests.e2e_engine``: the reference engine plus fault injection by prompt token,
``w901`` raises, ``w902`` hangs, ``w903`` yields after its terminal) on 127.0.0.1.
Raw-wire tests talk to the worker's TCP request port directly, with a call-home
listener of their own, and then check the worker still serves through the frontend.
Bounds stated here are collected in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import uuid
from pathlib import Path

import aiohttp
import msgpack
import pytest
from conftest import Stack, free_port, wait_until
from reliability_results import record
from worker_probes import events, scrape, words

from backend_common.devstack.openai import chat, completion
from backend_common.transport.codec import (
    ControlMessage,
    decode_payload,
    encode_request_frame,
    encode_two_part,
    read_ack,
    read_two_part,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

HANG_BOUND_S = 1.5  # DYN_ENGINE_STREAM_TIMEOUT_SECS in the fault test
HANG_SLACK_S = 2.0  # scheduling on a loaded 2-core machine
KILL_GRACE_S = 2.0  # adapter.KILL_GRACE_S: abort() first, the task cancelled this much later
# Client gives up -> the frontend notices the disconnect and sends kill -> abort, then the
# kill grace -> the request's task is cancelled and released. Slack for the propagation.
RELEASE_BOUND_S = KILL_GRACE_S + 1.5


def worker_tcp(stack: Stack, model: str) -> tuple[int, str]:
    """(port, frame path) of the worker serving ``model``, read from file discovery."""
    root = Path(stack.frontend.file_kv) / "v1" / "instances"
    for f in root.iterdir():
        record = json.loads(f.read_text())
        tcp = (record.get("transport") or {}).get("tcp")
        if tcp:
            addr, _, path = tcp.partition("/")
            return int(addr.rsplit(":", 1)[1]), path
    raise AssertionError(f"no tcp instance record for {model} under {root}")


class CallHomeSink:
    """A call-home listener standing in for the frontend: collects each stream's frames."""

    def __init__(self) -> None:
        self.streams: asyncio.Queue[list[tuple[bytes, bytes]]] = asyncio.Queue()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            frames: list[tuple[bytes, bytes]] = []
            try:
                for _ in range(5000):  # bounded: the longest stream here is 2048 tokens
                    header, body = await read_two_part(r)
                    frames.append((header, body))
                    if header == b'"sentinel"' or (header and b'"error":"' in header):
                        break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                w.close()
                await self.streams.put(frames)

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def next(self, timeout: float = 10) -> list[tuple[bytes, bytes]]:  # noqa: ASYNC109
        return await asyncio.wait_for(self.streams.get(), timeout)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def request_body(address: str, body: dict | bytes, codec: str = "json") -> bytes:
    control = ControlMessage(
        id=str(uuid.uuid4()), payload_codec=codec, address=address, subject=str(uuid.uuid4())
    ).to_json()
    if isinstance(body, bytes):
        payload = body
    elif codec == "json":
        payload = json.dumps(body).encode()  # allow_nan: NaN goes out as the literal NaN
    else:
        payload = msgpack.packb(body)
    return encode_two_part(control, payload)


async def send_raw(port: int, data: bytes, *, want_ack: bool = True) -> str | None:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(data)
        await writer.drain()
        if want_ack:
            return await asyncio.wait_for(read_ack(reader), 5)
        # Hostile frame: the worker must close this connection promptly.
        rest = await asyncio.wait_for(reader.read(), 5)
        assert rest == b"", rest
        return None
    finally:
        writer.close()


def prologue(frames: list[tuple[bytes, bytes]]) -> dict:
    assert len(frames) >= 2, frames
    assert json.loads(frames[0][0])["stream_type"] == "response"
    return json.loads(frames[1][0])


def items(frames: list[tuple[bytes, bytes]], codec: str = "json") -> list[dict]:
    out = []
    for _header, body in frames[2:]:
        if body:
            msg = decode_payload(body, codec)
            if "data" in msg:
                out.append(msg["data"]["data"])
    return out


async def test_engine_faults_end_typed_and_worker_keeps_serving(make_stack) -> None:
    """Raise mid-stream, hang, yield-after-terminal: each ends within a bound; others unaffected."""
    stack: Stack = make_stack("file", "tcp")
    port = free_port()
    env = {"DYN_ENGINE_STREAM_TIMEOUT_SECS": str(HANG_BOUND_S)}
    proc = stack.serve("tiny-faults", "--delay", "0.01", system_port=port, env=env)
    base = stack.frontend.base_url
    async with aiohttp.ClientSession() as s:

        def req(prompt: str, n: int, stream: bool = True):
            return chat(s, base, "tiny-faults", prompt, max_tokens=n, stream=stream, timeout=20)

        healthy = asyncio.create_task(req("w1", 200))  # ~2 s, spans every fault below
        raised, raised_full, hung, after = await asyncio.gather(
            req("w901", 10), req("w901", 10, stream=False), req("w902", 10), req("w903", 4)
        )
        good = await healthy

    record(
        "engine_faults",
        title="Engine raises / hangs (stream timeout 1.5 s) / yields after its terminal",
        order=50,
        bounds=[
            "raise: tokens so far + SSE error (code 500), non-streaming HTTP 500",
            f"hang: error event within {HANG_BOUND_S} + {HANG_SLACK_S:.0f} s",
            "extra item dropped; a concurrent stream unaffected; no abort",
        ],
        summary=(
            f"raise: {raised.status} + error {raised.error and raised.error.get('code')}, "
            f"non-streaming {raised_full.status}; hang: error "
            f"{hung.error and hung.error.get('code')} after {hung.e2e_s:.2f} s; "
            f"after-terminal: {after.finish_reason}; concurrent 200-token stream: "
            f"{good.finish_reason}"
        ),
        measured={
            "raise_status": raised.status,
            "raise_full_status": raised_full.status,
            "hang_error_s": round(hung.e2e_s, 3),
            "after_terminal_finish": after.finish_reason,
            "concurrent_finish": good.finish_reason,
        },
    )
    # Raise mid-stream: the tokens so far, then a typed error event (500), never a hang.
    assert raised.status == 200 and raised.text.strip() == words(3).strip()
    assert raised.error is not None and raised.error.get("code") == 500
    assert raised.finish_reason is None
    assert raised_full.status == 500
    # Hang: ended by the stream timeout with a ResponseTimeout error event (the frontend's
    # 504, backend_common/docs/errors.md), within the bound (+ slack).
    assert hung.status == 200 and hung.error is not None and hung.error.get("code") == 504
    assert hung.text.strip() == words(2).strip()
    assert hung.e2e_s < HANG_BOUND_S + HANG_SLACK_S, f"hang ended after {hung.e2e_s:.2f} s"
    # Yield after terminal: the extra item is dropped; the stream is clean.
    assert after.ok and after.finish_reason == "length" and after.text.strip() == words(4).strip()
    # The concurrent healthy stream never noticed.
    assert good.ok and good.finish_reason == "length" and good.text.strip() == words(200).strip()

    wait_until(lambda: scrape(port)["dynamo_component_inflight_requests"] == 0, 5)
    metrics = scrape(port)
    assert metrics["e2e_engine_guarded_requests"] == 0
    assert "tiny-faults" in stack.frontend.models() and proc.running
    assert events(proc, "abort") == []  # faults are not cancellations
    async with aiohttp.ClientSession() as s:
        again = await chat(s, base, "tiny-faults", "w1", max_tokens=3, stream=True)
    assert again.ok and again.finish_reason == "length"


async def test_hung_engine_is_released_after_client_disconnect(make_stack) -> None:
    """No stream timeout set: the client's own timeout ends the request; the worker then
    cancels the stuck engine task (kill grace 2 s), releases it and keeps serving. The time
    from the client giving up to nothing in flight is asserted against RELEASE_BOUND_S."""
    stack: Stack = make_stack("file", "tcp")
    port = free_port()
    proc = stack.serve("tiny-hang", system_port=port)
    base = stack.frontend.base_url
    async with aiohttp.ClientSession() as s:
        with pytest.raises(TimeoutError):
            await chat(s, base, "tiny-hang", "w902", max_tokens=10, stream=True, timeout=1.5)
        gave_up = time.monotonic()
        # Poll the worker (not the frontend) until the hung request is released.
        released_s: float | None = None
        deadline = gave_up + RELEASE_BOUND_S + 10
        while time.monotonic() < deadline:
            m = await asyncio.to_thread(scrape, port)
            if (
                m["dynamo_component_inflight_requests"] == 0
                and m["e2e_engine_guarded_requests"] == 0
            ):
                released_s = time.monotonic() - gave_up
                break
            await asyncio.sleep(0.05)
        ok = await chat(s, base, "tiny-hang", "w1", max_tokens=5, stream=True)
    hung = events(proc, "hang")
    record(
        "engine_hang_release",
        title="Engine hangs, no stream timeout; client gives up",
        order=60,
        bounds=[
            f"released (inflight 0, guard released) <= {RELEASE_BOUND_S:.1f} s after the client "
            f"disconnects (kill grace {KILL_GRACE_S:.0f} s + propagation)",
            "abort exactly once",
        ],
        summary=(
            f"released {released_s:.2f} s after the client gave up; aborts "
            f"{len(events(proc, 'abort'))}"
            if released_s is not None
            else "never released"
        ),
        measured={"released_s": released_s, "aborts": len(events(proc, "abort"))},
    )
    assert released_s is not None and released_s <= RELEASE_BOUND_S, (
        f"hung request released after {released_s} s (bound {RELEASE_BOUND_S} s)"
    )
    assert ok.ok and ok.finish_reason == "length"
    assert len(hung) == 1
    assert events(proc, "abort") == hung  # abort exactly once, for the hung request
    assert hung[0] in events(proc, "release")
    assert "engine ignored kill" in proc.log_path.read_text()


async def test_hostile_frames_on_a_live_worker(make_stack) -> None:
    """Garbage, oversized length prefixes and malformed bodies sent straight to the worker's
    TCP port: bad frames close only their connection, malformed bodies get a typed
    InvalidArgument prologue, and the worker keeps serving through the frontend."""
    stack: Stack = make_stack("file", "tcp")
    sport = free_port()
    proc = stack.serve("tiny-hostile", system_port=sport)
    port, path = worker_tcp(stack, "tiny-hostile")
    rss_before = scrape(sport)["e2e_engine_rss_bytes"]

    # Framing errors: the connection is closed without an ACK, at once.
    hostile = [
        b"\x00\x00",  # zero path length
        struct.pack(">H", 0xFFFF) + b"x" * 10,  # path longer than 1024
        struct.pack(">H", 2) + b"\xff\xfe",  # path not UTF-8
        struct.pack(">H", len(path)) + path.encode() + b"\x00\x00" + b"\xff\xff\xff\xff",
    ]
    for data in hostile:
        await send_raw(port, data, want_ack=False)
    # The last one claimed a 4 GiB body: refused before allocation (RSS did not jump).
    assert scrape(sport)["e2e_engine_rss_bytes"] < rss_before + 64 * 2**20

    sink = CallHomeSink()
    address = await sink.start()
    try:
        # Undecodable TwoPart / control header: ACKed, then dropped (no address to answer).
        for body in (b"\x00" * 10, encode_two_part(b"{not json", b"{}")):
            assert await send_raw(port, encode_request_frame(path, {}, body)) is None
        # Bodies that decode but are not requests, or break the request policy.
        bad = [
            (b"[1, 2", "json"),
            (b"\xc1", "msgpack"),
            ({"token_ids": "w1"}, "json"),
            ({"token_ids": [1, -2]}, "msgpack"),
            ({"token_ids": []}, "json"),
            ({"token_ids": [1, 2051]}, "json"),  # vocabulary is 2051 ids
            ({"token_ids": [1], "stop_conditions": {"max_tokens": 0}}, "json"),
            ({"token_ids": [1], "sampling_options": {"temperature": float("nan")}}, "json"),
            ({"token_ids": [1], "sampling_options": {"top_p": float("inf")}}, "msgpack"),
            ({"token_ids": [1], "sampling_options": {"temperature": -0.5}}, "msgpack"),
            ({"token_ids": [1] * 2048}, "json"),  # no room in the 2048-token context
        ]
        for body, codec in bad:
            frame = encode_request_frame(path, {}, request_body(address, body, codec))
            assert await send_raw(port, frame) is None
            p = prologue(await sink.next())
            assert p["typed_error"]["error_type"] == "InvalidArgument", (body, p)
        # A huge max_tokens is clamped to the context: 2048 - 2 prompt tokens.
        body = {"token_ids": [5, 6], "stop_conditions": {"max_tokens": 2**32 - 1}}
        frame = encode_request_frame(path, {}, request_body(address, body, "msgpack"))
        assert await send_raw(port, frame) is None
        frames = await sink.next()
        assert prologue(frames) == {"error": None}
        out = items(frames, "msgpack")
        assert sum(len(i["token_ids"]) for i in out) == 2046
        assert out[-1]["finish_reason"] == "length"
    finally:
        sink.close()

    rss_after = scrape(sport)["e2e_engine_rss_bytes"]
    record(
        "hostile_frames",
        title="Hostile frames and bodies on a live worker's TCP port",
        order=75,
        bounds=[
            f"{len(hostile)} framing errors: connection closed, no ACK, RSS +< 64 MiB",
            f"{len(bad)} malformed/bad bodies: typed `InvalidArgument`",
            "worker serves on",
        ],
        summary=(
            f"{len(hostile)} hostile frames closed (incl. a 4 GiB body prefix); RSS "
            f"{rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB; {len(bad)} bad bodies -> "
            "`InvalidArgument`; 2 undecodable bodies ACKed and dropped; worker "
            f"{'running' if proc.running else 'DEAD'}"
        ),
        measured={"rss_mib": [rss_before / 2**20, rss_after / 2**20], "running": proc.running},
    )
    assert proc.running
    async with aiohttp.ClientSession() as s:
        ok = await chat(s, stack.frontend.base_url, "tiny-hostile", "w1", max_tokens=4, stream=True)
    assert ok.ok and ok.text.strip() == words(4).strip()
    assert "tiny-hostile" in stack.frontend.models()
    wait_until(lambda: scrape(sport)["dynamo_component_inflight_requests"] == 0, 5)


async def test_bad_openai_requests_are_400_and_never_reach_a_crash(make_stack) -> None:
    """The same bad inputs through the real frontend: each one is answered HTTP 400 (the
    frontend refuses most itself; what it passes on, the worker's request policy refuses
    with a typed InvalidArgument); a too-large max_tokens is clamped; the worker stays up."""
    stack: Stack = make_stack("file", "tcp")
    proc = stack.serve("tiny-bad")
    base = stack.frontend.base_url
    cases = [
        {"max_tokens": 0},
        {"max_tokens": 10**9},
        {"temperature": -1},
        {"top_p": 7},
        {"top_k": -5},
        {"repetition_penalty": -1},
    ]
    started = time.monotonic()
    statuses: list[tuple[str, int, str]] = []
    async with aiohttp.ClientSession() as s:
        for extra in cases:
            r = await chat(s, base, "tiny-bad", "w1", max_tokens=None, stream=False, extra=extra)
            message = str((r.error or {}).get("message", ""))[:80]
            statuses.append((json.dumps(extra), r.status, message))
        # An empty completion prompt is bad; an empty chat message is not (the chat template
        # still makes a prompt of it): it is served.
        r = await completion(s, base, "tiny-bad", "", max_tokens=2, stream=False)
        statuses.append(('{"prompt": ""}', r.status, str((r.error or {}).get("message", ""))[:80]))
        empty_chat = await chat(s, base, "tiny-bad", "", max_tokens=2, stream=False)
        # Larger than the context: clamped by the worker to what fits (2048 - prompt).
        big = await chat(s, base, "tiny-bad", "w1", max_tokens=5000, stream=False)
    elapsed = time.monotonic() - started
    record(
        "bad_openai_requests",
        title="Bad OpenAI requests through the frontend",
        order=80,
        bounds=[
            f"each of {len(statuses)} bad inputs -> HTTP 400",
            "empty chat message served",
            "max_tokens 5000 clamped to fit the 2048-token context",
        ],
        summary=(
            f"{sum(code == 400 for _, code, _ in statuses)}/{len(statuses)} answered 400; "
            f"empty chat message: {empty_chat.status}; "
            f"max_tokens 5000 -> {big.usage and big.usage['completion_tokens']} tokens "
            f"({big.finish_reason})"
        ),
        measured={"cases": statuses, "clamped_usage": big.usage, "elapsed_s": round(elapsed, 2)},
    )
    not_400 = [(case, code, msg) for case, code, msg in statuses if code != 400]
    assert not not_400, f"bad inputs not answered 400: {not_400}"
    assert empty_chat.ok and empty_chat.finish_reason == "length", empty_chat
    assert big.ok and big.finish_reason == "length"
    assert big.usage["prompt_tokens"] + big.usage["completion_tokens"] == 2048
    assert elapsed < 60
    assert proc.running and "tiny-bad" in stack.frontend.models()

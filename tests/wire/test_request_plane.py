"""``RequestPlane``: one interface for TCP and NATS, decoding requests down to ``IncomingRequest``.

Each plane is driven as the worker drives it (``request_plane_for(config, admit, handle)``,
``start``, ``transport``, ``serve_instance``, ``close``) against a fake frontend written here
(TCP frames on 127.0.0.1) or a real nats-server started by the test.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from test_transport import nats_url  # noqa: F401 - the fixture (a real nats-server)

from backend_common.config import WorkerConfig
from backend_common.errors import DynamoError
from backend_common.transport.codec import (
    ControlMessage,
    encode_request_frame,
    encode_two_part,
    read_ack,
)
from backend_common.transport.plane import (
    IncomingRequest,
    NatsRequestPlane,
    TcpRequestPlane,
    request_plane_for,
)

pytestmark = pytest.mark.timeout(60)

NAMES = {"namespace": "dynamo", "component": "backend", "endpoint": "generate"}
INSTANCE = 0x6A6CA21AD223B164


def body(request: dict[str, Any], **control: Any) -> bytes:
    msg = ControlMessage(id="req-1", address="127.0.0.1:9", subject="s-1", **control)
    return encode_two_part(msg.to_json(), json.dumps(request).encode())


class Sink:
    def __init__(self) -> None:
        self.refusal: str | None = None
        self.got: asyncio.Queue[IncomingRequest] = asyncio.Queue()

    def admit(self) -> str | None:
        return self.refusal

    async def handle(self, incoming: IncomingRequest) -> None:
        await self.got.put(incoming)


async def tcp_call(plane: TcpRequestPlane, path: str, payload: bytes) -> str | None:
    reader, writer = await asyncio.open_connection(plane.server.host, plane.server.port)
    try:
        writer.write(encode_request_frame(path, {"request-id": "req-1"}, payload))
        await writer.drain()
        return await asyncio.wait_for(read_ack(reader), 5)
    finally:
        writer.close()


async def test_tcp_plane_decodes_to_an_incoming_request() -> None:
    sink = Sink()
    plane = request_plane_for(
        WorkerConfig(**NAMES, tcp_port=0), admit=sink.admit, handle=sink.handle
    )
    assert isinstance(plane, TcpRequestPlane)
    await plane.start(INSTANCE)
    try:
        transport = plane.transport(INSTANCE)
        addr, _, path = transport["tcp"].partition("/")
        assert addr == f"127.0.0.1:{plane.server.port}"
        assert path == f"{INSTANCE:x}/dynamo/backend/generate"

        assert await tcp_call(plane, path, body({"token_ids": [1, 2]})) is None
        incoming = await asyncio.wait_for(sink.got.get(), 5)
        assert incoming.control.id == "req-1" and incoming.control.address == "127.0.0.1:9"
        assert incoming.headers == {"request-id": "req-1"}
        assert incoming.decode().token_ids == [1, 2]

        # Another endpoint: refused by the plane; a closed admission: the worker's string.
        refused = await tcp_call(plane, f"{INSTANCE:x}/dynamo/backend/other", body({}))
        assert refused is not None and refused.startswith("Server unavailable: unknown endpoint")
        sink.refusal = "Server unavailable: worker is shutting down"
        assert await tcp_call(plane, path, body({})) == sink.refusal
        sink.refusal = None

        # Accepted but unanswerable (no control header / another response transport): dropped.
        assert await tcp_call(plane, path, b"not a two-part message") is None
        assert await tcp_call(plane, path, body({}, transport="quic")) is None
        # Any instance id prefix is this process (a re-registration changes the id).
        await plane.serve_instance(INSTANCE + 1)
        assert await tcp_call(plane, f"{INSTANCE + 1:x}/dynamo/backend/generate", body({})) is None
        again = await asyncio.wait_for(sink.got.get(), 5)
        assert again.control.id == "req-1" and sink.got.empty()
    finally:
        await plane.close()


async def test_a_malformed_body_is_a_typed_error_at_decode() -> None:
    control = ControlMessage(id="r", address="127.0.0.1:9", subject="s")
    incoming = IncomingRequest(control, {}, b'{"token_ids": "nope"}')
    with pytest.raises(DynamoError) as err:
        incoming.decode()
    assert err.value.is_invalid_argument and "malformed request body" in err.value.message


async def test_a_body_over_the_configured_limit_closes_the_connection() -> None:
    sink = Sink()
    config = WorkerConfig(**NAMES, max_message_size=64)
    plane = request_plane_for(config, admit=sink.admit, handle=sink.handle)
    await plane.start(INSTANCE)
    try:
        path = f"{INSTANCE:x}/dynamo/backend/generate"
        with pytest.raises(asyncio.IncompleteReadError):
            await tcp_call(plane, path, body({"token_ids": list(range(100))}))
        assert await tcp_call(plane, path, b"x" * 64) is None  # at the limit: accepted
    finally:
        await plane.close()


async def test_nats_plane_serves_its_instance_subjects(nats_url: str) -> None:  # noqa: F811
    import nats

    sink = Sink()
    config = WorkerConfig(**NAMES, request_plane="nats", nats_server=nats_url)
    plane = request_plane_for(config, admit=sink.admit, handle=sink.handle)
    assert isinstance(plane, NatsRequestPlane)
    await plane.start(INSTANCE)
    client = await nats.connect(nats_url, allow_reconnect=False, connect_timeout=5)
    try:
        subject = plane.transport(INSTANCE)["nats_tcp"]
        assert subject == f"dynamo_backend.generate-{INSTANCE:x}"
        ack = await client.request(subject, body({"token_ids": [3]}), timeout=5)
        assert ack.data == b""
        incoming = await asyncio.wait_for(sink.got.get(), 5)
        assert incoming.decode().token_ids == [3]

        sink.refusal = "Server unavailable: worker is shutting down"
        ack = await client.request(subject, body({}), timeout=5)
        assert ack.data == sink.refusal.encode()
        sink.refusal = None

        await plane.serve_instance(INSTANCE + 1)
        new_subject = plane.transport(INSTANCE + 1)["nats_tcp"]
        ack = await client.request(new_subject, body({"token_ids": [4]}), timeout=5)
        assert ack.data == b""
        assert (await asyncio.wait_for(sink.got.get(), 5)).decode().token_ids == [4]
    finally:
        await client.close()
        await plane.close()

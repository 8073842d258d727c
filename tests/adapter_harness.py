"""Drive the real ``EngineAdapter`` with one crafted request, as the frontend would.

``await run_request(adapter, request_dict, headers=...)`` starts a call-home listener on
127.0.0.1, builds the TwoPart body (control header + JSON request) the 1.6.1 frontend
sends, decodes it as the request plane does (``decode_incoming``), calls ``adapter.handle``
and returns every byte the worker sent back (bounded wait).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from backend_common.runtime.adapter import EngineAdapter
from backend_common.transport.codec import (
    MAX_MESSAGE_LEN,
    ControlMessage,
    encode_two_part,
    sentinel_frame,
)
from backend_common.transport.plane import decode_incoming

TIMEOUT_S = 10.0
PATH = "1/dynamo/backend/generate"


async def run_request(
    adapter: EngineAdapter,
    request: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    request_id: str = "req-1",
) -> bytes:
    received = bytearray()
    done = asyncio.Event()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # Close like the frontend does: right after the sentinel frame.
            while not received.endswith(sentinel_frame()):
                chunk = await reader.read(65536)
                if not chunk:
                    break
                received.extend(chunk)
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        control = ControlMessage(
            id=request_id, address=f"127.0.0.1:{port}", subject=f"subject-{request_id}"
        )
        body = encode_two_part(control.to_json(), json.dumps(request).encode())
        incoming = decode_incoming(PATH, dict(headers or {}), body, max_body=MAX_MESSAGE_LEN)
        assert incoming is not None
        await asyncio.wait_for(adapter.handle(incoming), TIMEOUT_S)
        await asyncio.wait_for(done.wait(), TIMEOUT_S)
    finally:
        server.close()
    return bytes(received)

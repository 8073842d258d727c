"""When the adapter calls ``engine.abort``: once per cancelled request, never on a natural
end, and on a decode worker only after the first token (contract 11.5)."""

from __future__ import annotations

import asyncio

from backend_common.config import DisaggregationMode
from backend_common.reference import ReferenceEngine
from backend_common.runtime.adapter import EngineAdapter


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_aggregated_abort_runs_at_once_and_only_once() -> None:
    engine = ReferenceEngine()
    adapter = EngineAdapter(engine)
    entry = adapter.new_entry("r1")
    adapter._cancel(entry, kill=False)
    adapter._cancel(entry, kill=True)
    await settle()
    assert engine.aborted == ["r1"]
    assert entry.ctx.is_killed()


async def test_decode_abort_waits_for_the_first_token() -> None:
    engine = ReferenceEngine(mode=DisaggregationMode.DECODE)
    adapter = EngineAdapter(engine, mode=DisaggregationMode.DECODE)
    entry = adapter.new_entry("r2")
    adapter._cancel(entry, kill=False)
    await settle()
    assert engine.aborted == []
    assert entry.ctx.is_stopped()
    entry.ctx.notify_first_token()
    entry.ctx.notify_first_token()
    await settle()
    assert engine.aborted == ["r2"]


async def test_decode_abort_after_the_first_token_is_immediate() -> None:
    engine = ReferenceEngine(mode=DisaggregationMode.DECODE)
    adapter = EngineAdapter(engine, mode=DisaggregationMode.DECODE)
    entry = adapter.new_entry("r3")
    entry.ctx.notify_first_token()
    adapter._cancel(entry, kill=True)
    await settle()
    assert engine.aborted == ["r3"]


async def test_decode_stream_dropped_before_first_token_is_never_aborted() -> None:
    engine = ReferenceEngine(mode=DisaggregationMode.DECODE)
    adapter = EngineAdapter(engine, mode=DisaggregationMode.DECODE)
    entry = adapter.new_entry("r4")
    adapter._cancel(entry, kill=True)
    await asyncio.sleep(0.05)
    assert engine.aborted == []
    assert entry.abort_deferred


async def test_response_stream_closed_by_the_frontend_is_a_cancellation(monkeypatch) -> None:
    """The frontend drops the call-home connection mid-stream without a stop/kill (its
    client went away), and the worker notices it on a write before its control reader sees
    the EOF (the usual order under load: a reset): abort() still runs, once.

    The reader's own EOF handling (it reports a kill) is switched off to force that order."""
    from backend_common.transport.callhome import CallHome
    from backend_common.transport.codec import MAX_MESSAGE_LEN, ControlMessage, encode_two_part
    from backend_common.transport.plane import decode_incoming

    def peer_gone_silently(self: CallHome) -> None:
        self.peer_closed = True

    monkeypatch.setattr(CallHome, "_mark_peer_gone", peer_gone_silently)
    engine = ReferenceEngine(delay=0.01)
    adapter = EngineAdapter(engine)

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the stream has started: leave mid-stream
        await asyncio.sleep(0.05)
        writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        control = ControlMessage(id="r5", address=f"127.0.0.1:{port}", subject="s-r5")
        body = encode_two_part(
            control.to_json(), b'{"token_ids": [1], "stop_conditions": {"max_tokens": 1000}}'
        )
        incoming = decode_incoming("1/dynamo/backend/generate", {}, body, max_body=MAX_MESSAGE_LEN)
        assert incoming is not None
        await asyncio.wait_for(adapter.handle(incoming), 10)
    finally:
        server.close()
    await settle()
    assert engine.aborted == ["r5"]
    assert engine.active == 0
    assert not adapter.active

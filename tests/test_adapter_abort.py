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

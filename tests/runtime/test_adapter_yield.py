"""The adapter's per-item loop: a busy engine cannot starve the event loop, and an engine
that suspends per token pays no extra loop iteration for it."""

from __future__ import annotations

import asyncio

from adapter_harness import run_request

from backend_common import EngineConfig, LLMEngine, LLMEngineOutput, chunk, usage
from backend_common.runtime.adapter import YIELD_EVERY, EngineAdapter
from backend_common.transport.callhome import CallHome

TOKENS = 8 * YIELD_EVERY


class _Engine(LLMEngine):
    def __init__(self, suspend: bool) -> None:
        self.suspend = suspend

    async def start(self, worker_id: int) -> EngineConfig:
        return EngineConfig(model="m")

    async def generate(self, request, ctx):
        for i in range(1, TOKENS):
            if self.suspend:
                await asyncio.sleep(0)
            yield chunk.token(i)
        yield LLMEngineOutput.length().with_tokens([TOKENS]).with_usage(usage(1, TOKENS))

    async def cleanup(self) -> None:
        pass


async def _ticks_during_stream(suspend: bool) -> tuple[int, bytes]:
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    adapter = EngineAdapter(_Engine(suspend), engine_config=EngineConfig(model="m"))
    task = asyncio.create_task(ticker())
    try:
        request = {"token_ids": [1], "stop_conditions": {"max_tokens": TOKENS}}
        out = await run_request(adapter, request)
    finally:
        stop.set()
        await task
    return ticks, out


async def test_an_engine_that_never_awaits_still_lets_other_tasks_run() -> None:
    ticks, out = await _ticks_during_stream(suspend=False)
    assert out.count(b'"token_ids":') == TOKENS
    # At least one forced yield per YIELD_EVERY items (the frames pile up between them).
    assert ticks >= TOKENS // YIELD_EVERY - 1


async def test_an_engine_that_suspends_per_token_gets_no_extra_drains(monkeypatch) -> None:
    drains = 0
    original = CallHome.drain

    async def counting_drain(self: CallHome) -> None:
        nonlocal drains
        drains += 1
        await original(self)

    monkeypatch.setattr(CallHome, "drain", counting_drain)
    ticks, out = await _ticks_during_stream(suspend=True)
    assert out.count(b'"token_ids":') == TOKENS
    assert ticks >= TOKENS - 1  # one per engine suspension
    # Only finish() drains: no forced drain + yield every YIELD_EVERY items.
    assert drains <= 2
    drains = 0
    await _ticks_during_stream(suspend=False)
    assert drains >= TOKENS // YIELD_EVERY - 1

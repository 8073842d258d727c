"""Tests of your engine's own behaviour. This file is yours (``copier update`` keeps it).

As generated they pin down the skeleton: deterministic tokens, ``max_tokens``, usage,
cancellation, the request guard. Change them along
with the engine.
"""

from __future__ import annotations

import asyncio

import pytest
from backend_common import DynamoError, FinishReason, GenerateContext, PreprocessedRequest
from backend_common.request_policy import check_request
from backend_common.testing import collect

from skeleton_cpu.engine import SkeletonCpuEngine


def request(prompt: int = 3, max_tokens: int | None = 5, **extra) -> PreprocessedRequest:
    return PreprocessedRequest(
        model="test",
        token_ids=list(range(10, 10 + prompt)),
        stop_conditions={"max_tokens": max_tokens},
        **extra,
    )


async def started(*argv: str) -> SkeletonCpuEngine:
    engine, _config = SkeletonCpuEngine.from_args(["--model-name", "test", *argv])
    await engine.start(1)
    return engine


async def test_streams_deterministic_tokens_then_a_length_terminal_with_usage() -> None:
    engine = await started()
    items = await collect(engine, request(prompt=3, max_tokens=5))
    assert [t for item in items for t in item.token_ids] == [1, 2, 3, 4, 5]
    assert [item.finish_reason for item in items] == [None] * 4 + [FinishReason.LENGTH]
    assert items[-1].completion_usage["prompt_tokens"] == 3
    assert items[-1].completion_usage["completion_tokens"] == 5


async def test_max_tokens_defaults_to_the_flag() -> None:
    engine = await started("--max-tokens", "7")
    items = await collect(engine, request(max_tokens=None))
    assert sum(len(item.token_ids) for item in items) == 7


async def test_bad_requests_are_invalid_arguments() -> None:
    # The worker checks every request against what start() returned, before generate
    # (backend_common.request_policy): an empty prompt or one that fills the context never
    # reaches the engine.
    engine, _config = SkeletonCpuEngine.from_args(["--model-name", "test"])
    config = await engine.start(1)
    for bad in (request(prompt=0), request(prompt=engine.context_length)):
        with pytest.raises(DynamoError) as info:
            check_request(bad, config)
        assert info.value.is_invalid_argument


async def test_generate_before_start_is_a_typed_error() -> None:
    engine, _config = SkeletonCpuEngine.from_args([])
    with pytest.raises(DynamoError):
        await collect(engine, request())


async def test_negative_delay_is_rejected() -> None:
    with pytest.raises(DynamoError) as info:
        SkeletonCpuEngine.from_args(["--delay", "-1"])
    assert info.value.is_invalid_argument


async def test_cancel_during_a_delay_ends_with_a_cancelled_terminal() -> None:
    engine = await started("--delay", "30")
    ctx = GenerateContext()
    stream = engine.generate(request(max_tokens=100), ctx)
    asyncio.get_running_loop().call_later(0.05, ctx.stop_generating)
    items = [item async for item in stream]  # pytest-timeout bounds this if it hangs
    assert items[-1].finish_reason is FinishReason.CANCELLED
    assert items[-1].completion_usage["completion_tokens"] == 0
    assert len(engine.active) == 0


async def test_closing_a_stream_early_frees_the_request() -> None:
    engine = await started()
    stream = engine.generate(request(max_tokens=100), GenerateContext())
    await anext(stream)
    assert len(engine.active) == 1
    await stream.aclose()
    assert len(engine.active) == 0


async def test_cleanup_stops_open_streams() -> None:
    engine = await started()
    stream = engine.generate(request(max_tokens=100), GenerateContext())
    await anext(stream)
    await engine.cleanup()
    rest = [item async for item in stream]
    assert rest[-1].finish_reason is FinishReason.CANCELLED
    await engine.cleanup()  # idempotent

"""``ActiveRequests`` releases a request's resources exactly once, on every exit path.

It lives in the runtime (``backend_common.ActiveRequests``); the package's ``guard`` module
re-exports it for ``engine.py`` files that import it from there.
"""

from __future__ import annotations

import asyncio
import gc

import backend_common
import pytest
from backend_common import GenerateContext

from vllm_cpu_backend.guard import ActiveRequests


def make_stream(active: ActiveRequests, ctx: GenerateContext, released: list[str], fail=False):
    async def stream():
        with active.track(ctx, release=lambda: released.append(ctx.id())):
            for i in range(100):
                if fail and i == 2:
                    raise RuntimeError("engine failed")
                yield i

    return stream()


async def test_release_on_natural_finish() -> None:
    active, released = ActiveRequests(), []
    ctx = GenerateContext("a")
    assert [i async for i in make_stream(active, ctx, released)] == list(range(100))
    assert released == ["a"]
    assert len(active) == 0


async def test_release_on_error() -> None:
    active, released = ActiveRequests(), []
    with pytest.raises(RuntimeError):
        async for _ in make_stream(active, GenerateContext("b"), released, fail=True):
            pass
    assert released == ["b"]
    assert len(active) == 0


async def test_release_when_the_consumer_closes_early() -> None:
    active, released = ActiveRequests(), []
    stream = make_stream(active, GenerateContext("c"), released)
    assert await anext(stream) == 0
    assert active.request_ids() == ["c"]
    await stream.aclose()
    assert released == ["c"]
    assert len(active) == 0


async def test_release_when_an_unclosed_stream_is_collected() -> None:
    active, released = ActiveRequests(), []
    stream = make_stream(active, GenerateContext("d"), released)
    await anext(stream)
    del stream
    gc.collect()
    # asyncio finalizes a collected async generator by scheduling its aclose() as a task.
    for _ in range(10):
        if released:
            break
        await asyncio.sleep(0)
    assert released == ["d"]
    assert len(active) == 0


async def test_same_request_id_twice_is_tracked_twice() -> None:
    active, released = ActiveRequests(), []
    first = make_stream(active, GenerateContext("same"), released)
    second = make_stream(active, GenerateContext("same"), released)
    await anext(first)
    await anext(second)
    assert len(active) == 2
    await first.aclose()
    assert len(active) == 1
    await second.aclose()
    assert released == ["same", "same"]


async def test_stop_all_stops_every_active_context() -> None:
    active = ActiveRequests()
    contexts = [GenerateContext(str(i)) for i in range(3)]
    guards = [active.track(ctx) for ctx in contexts]
    assert active.stop_all() == 3
    assert all(ctx.is_stopped() for ctx in contexts)
    for guard in guards:
        guard.release()
    assert len(active) == 0
    assert active.stop_all() == 0


def test_the_package_guard_module_is_the_runtimes() -> None:
    assert ActiveRequests is backend_common.ActiveRequests

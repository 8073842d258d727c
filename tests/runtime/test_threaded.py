"""ThreadFeed: items from a worker thread reach the request's stream in order; cancellation
is visible to the thread; the event loop never blocks on the producer."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from backend_common import GenerateContext, ThreadFeed

BOUND_S = 5.0


async def test_items_from_a_thread_arrive_in_order_then_end() -> None:
    feed: ThreadFeed[int] = ThreadFeed()

    def produce() -> None:
        for i in range(1000):
            feed.put(i)
        feed.close()

    t = threading.Thread(target=produce)
    t.start()
    got: list[int] = []
    async with asyncio.timeout(BOUND_S):
        async for batch in feed:
            got.extend(batch)
    t.join()
    assert got == list(range(1000))
    assert feed.put(1) is False  # closed: dropped


async def test_a_lagging_consumer_gets_batches_and_few_wakeups() -> None:
    feed: ThreadFeed[int] = ThreadFeed()
    done = threading.Event()

    def produce() -> None:
        for i in range(500):
            feed.put(i)
        feed.close()
        done.set()

    threading.Thread(target=produce).start()
    await asyncio.to_thread(done.wait, BOUND_S)
    batches = [b async for b in feed]
    assert [i for b in batches for i in b] == list(range(500))
    assert len(batches) <= 2  # all queued before the consumer looked: one batch, not 500


async def test_fail_delivers_items_then_raises() -> None:
    feed: ThreadFeed[str] = ThreadFeed()
    threading.Thread(target=lambda: (feed.put("a"), feed.fail(ValueError("bad")))).start()
    got: list[str] = []
    with pytest.raises(ValueError, match="bad"):
        async with asyncio.timeout(BOUND_S):
            async for batch in feed:
                got.extend(batch)
    assert got == ["a"]


async def test_ctx_stop_cancels_visible_to_the_thread_and_runs_callbacks_once() -> None:
    ctx = GenerateContext("r1")
    feed: ThreadFeed[int] = ThreadFeed(ctx)
    calls: list[int] = []
    feed.on_cancel(lambda: calls.append(1))
    seen_cancel = threading.Event()

    def produce() -> None:
        deadline = time.monotonic() + BOUND_S
        while not feed.cancelled and time.monotonic() < deadline:
            feed.put(1)
            time.sleep(0.001)
        if feed.cancelled:
            seen_cancel.set()

    t = threading.Thread(target=produce)
    t.start()
    async with asyncio.timeout(BOUND_S):
        batches = 0
        async for _ in feed:
            batches += 1
            if batches == 3:
                ctx.stop_generating()
    await asyncio.to_thread(t.join, BOUND_S)
    assert seen_cancel.is_set()
    assert calls == [1]
    feed.cancel()
    assert calls == [1]
    assert feed.put(2) is False


async def test_already_stopped_ctx_cancels_at_once() -> None:
    ctx = GenerateContext()
    ctx.kill()
    feed: ThreadFeed[int] = ThreadFeed(ctx)
    assert feed.cancelled
    assert await feed.get() == []


async def test_put_after_the_loop_closed_returns_false() -> None:
    holder: list[ThreadFeed[int]] = []

    def run_loop() -> None:
        async def make() -> None:
            holder.append(ThreadFeed())

        asyncio.run(make())

    await asyncio.to_thread(run_loop)
    assert holder[0].put(1) is False  # no exception on the worker thread

"""RequestGuard: the release callback runs exactly once on every way a stream can end."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from backend_common import ActiveRequests, GenerateContext, RequestGuard

BOUND_S = 2.0


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def make_stream(
    release: Counter, form: str, *, fail_at: int | None = None, block_at: int | None = None
):
    """An engine-like async generator guarded by RequestGuard in the given form."""

    async def body(i_max: int):
        for i in range(i_max):
            if i == fail_at:
                raise RuntimeError("engine failure")
            if i == block_at:
                await asyncio.Event().wait()  # blocks until cancelled
            await asyncio.sleep(0)
            yield i

    async def sync_form():
        with RequestGuard(release):
            async for i in body(5):
                yield i

    async def async_form():
        async with RequestGuard(release):
            async for i in body(5):
                yield i

    return sync_form() if form == "sync" else async_form()


FORMS = ["sync", "async"]


async def settle() -> None:
    # The loop's async-generator finalizer schedules aclose() as a task: give it turns.
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize("form", FORMS)
async def test_normal_end(form: str) -> None:
    release = Counter()
    items = [i async for i in make_stream(release, form)]
    assert items == [0, 1, 2, 3, 4]
    assert release.calls == 1


@pytest.mark.parametrize("form", FORMS)
async def test_exception(form: str) -> None:
    release = Counter()
    seen = []
    with pytest.raises(RuntimeError, match="engine failure"):
        async for i in make_stream(release, form, fail_at=2):
            seen.append(i)
    assert seen == [0, 1]
    assert release.calls == 1


@pytest.mark.parametrize("form", FORMS)
async def test_task_cancelled_while_awaiting_inside_generator(form: str) -> None:
    release = Counter()
    reached = asyncio.Event()
    stream = make_stream(release, form, block_at=1)

    async def consume() -> None:
        async for i in stream:
            if i == 0:
                reached.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(reached.wait(), BOUND_S)
    await asyncio.sleep(0)  # let it reach the blocking await inside the generator
    assert release.calls == 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, BOUND_S)
    assert release.calls == 1


@pytest.mark.parametrize("form", FORMS)
async def test_aclose_mid_stream(form: str) -> None:
    release = Counter()
    stream = make_stream(release, form)
    assert await stream.__anext__() == 0
    assert await stream.__anext__() == 1
    assert release.calls == 0
    await stream.aclose()
    assert release.calls == 1
    await stream.aclose()
    assert release.calls == 1


@pytest.mark.parametrize("form", FORMS)
async def test_consumer_breaks_early(form: str) -> None:
    release = Counter()
    stream = make_stream(release, form)
    async for i in stream:
        if i == 2:
            break
    await stream.aclose()  # what a well-behaved consumer (the worker) does after a break
    assert release.calls == 1


@pytest.mark.parametrize("form", FORMS)
async def test_dropped_without_close_and_garbage_collected(form: str) -> None:
    release = Counter()
    stream = make_stream(release, form)
    assert await stream.__anext__() == 0
    assert release.calls == 0
    del stream
    gc.collect()
    await settle()
    assert release.calls == 1
    gc.collect()
    await settle()
    assert release.calls == 1


@pytest.mark.parametrize("form", FORMS)
def test_dropped_without_event_loop_hooks(form: str) -> None:
    """A generator iterated outside any loop's asyncgen hooks is finalized synchronously."""
    release = Counter()
    stream = make_stream(release, form)
    # Drive one step by hand: no running loop, so no finalizer hook is installed.
    step = stream.__anext__()
    with pytest.raises(StopIteration):
        step.send(None)  # sleep(0) yields once ...
        step.send(None)  # ... then the first item is produced
    del step, stream
    gc.collect()
    assert release.calls == 1


def test_release_is_idempotent_and_exceptions_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    release = Counter()
    guard = RequestGuard(release)
    assert not guard.released
    guard.release()
    guard.release()
    with guard:
        pass
    assert guard.released and release.calls == 1

    def boom() -> None:
        raise RuntimeError("release failed")

    with caplog.at_level(logging.ERROR, logger="backend_common.guard"):
        RequestGuard(boom).release()  # must not raise
    assert "release callback failed" in caplog.text


def test_guard_collected_unreleased_releases() -> None:
    release = Counter()
    guard = RequestGuard(release)
    del guard
    gc.collect()
    assert release.calls == 1


def test_async_release_without_a_loop_is_dropped_loudly(caplog: pytest.LogCaptureFixture) -> None:
    ran = []

    async def release() -> None:
        ran.append(1)

    with caplog.at_level(logging.ERROR, logger="backend_common.guard"):
        with RequestGuard(release):
            pass
    assert ran == []
    assert "no running loop" in caplog.text


async def test_async_release_is_awaited_by_async_with() -> None:
    ran = []

    async def release() -> None:
        await asyncio.sleep(0)
        ran.append(1)

    async with RequestGuard(release) as guard:
        pass
    assert ran == [1] and guard.released
    await guard.arelease()
    assert ran == [1]


async def test_async_release_from_a_sync_exit_runs_as_a_task() -> None:
    ran = []

    async def release() -> None:
        ran.append(1)

    async def stream():
        with RequestGuard(release):
            yield 1
            yield 2

    gen = stream()
    assert await gen.__anext__() == 1
    await gen.aclose()  # GeneratorExit at the yield: the sync __exit__ schedules the coroutine
    for _ in range(5):
        await asyncio.sleep(0)
    assert ran == [1]


async def test_async_release_on_aclose_of_async_with_stream() -> None:
    ran = []

    async def release() -> None:
        await asyncio.sleep(0)
        ran.append(1)

    async def stream():
        async with RequestGuard(release):
            yield 1
            yield 2

    gen = stream()
    await gen.__anext__()
    await gen.aclose()
    assert ran == [1]


async def test_async_release_failure_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def release() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="backend_common.guard"):
        async with RequestGuard(release):
            pass
    assert "release callback failed" in caplog.text


# -- ActiveRequests ---------------------------------------------------------------------------
async def test_active_requests_track_release_once_and_stop_all() -> None:
    active, released = ActiveRequests(), []
    a, b = GenerateContext("same-id"), GenerateContext("same-id")  # ids may repeat

    async def stream(ctx: GenerateContext):
        with active.track(ctx, release=lambda: released.append(ctx)):
            while not ctx.is_stopped():
                yield 1
                await asyncio.sleep(0)

    streams = [stream(a), stream(b)]
    for s in streams:
        assert await s.__anext__() == 1
    assert len(active) == 2 and active.request_ids() == ["same-id", "same-id"]
    assert active.stop_all() == 2
    for s in streams:
        assert [item async for item in s] == []  # each ends on its own stop
    assert released == [a, b] and len(active) == 0
    assert active.stop_all() == 0

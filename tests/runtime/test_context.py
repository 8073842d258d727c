"""GenerateContext (contract.md §5): stop/kill state, awaitable signals, first-token notice."""

from __future__ import annotations

import asyncio

from backend_common import GenerateContext

BOUND_S = 2.0  # upper bound on waiting for a signal that must already be due


def test_id_is_given_or_unique() -> None:
    assert GenerateContext("req-1").id() == "req-1"
    ids = {GenerateContext().id() for _ in range(50)}
    assert len(ids) == 50 and all(ids)


def test_fresh_context_is_live() -> None:
    ctx = GenerateContext(metadata={"k": "v"})
    assert not ctx.is_stopped() and not ctx.is_killed()
    assert ctx.metadata == {"k": "v"}
    assert "live" in repr(ctx)


def test_stop_generating_is_idempotent_and_does_not_kill() -> None:
    ctx = GenerateContext()
    ctx.stop_generating()
    ctx.stop_generating()
    assert ctx.is_stopped() and not ctx.is_killed()
    other = GenerateContext()
    other.stop()  # alias
    assert other.is_stopped()


def test_kill_implies_stop() -> None:
    ctx = GenerateContext()
    ctx.kill()
    ctx.kill()
    assert ctx.is_killed() and ctx.is_stopped()
    assert "killed" in repr(ctx)


async def test_stopped_resolves_immediately_when_already_stopped() -> None:
    ctx = GenerateContext()
    ctx.stop_generating()
    await asyncio.wait_for(ctx.stopped(), BOUND_S)


async def test_stopped_wakes_every_waiter() -> None:
    ctx = GenerateContext()
    waiters = [asyncio.create_task(ctx.stopped()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    ctx.stop_generating()
    await asyncio.wait_for(asyncio.gather(*waiters), BOUND_S)


async def test_killed_waits_for_kill_not_stop() -> None:
    ctx = GenerateContext()
    killed = asyncio.create_task(ctx.killed())
    stopped = asyncio.create_task(ctx.stopped())
    ctx.stop_generating()
    await asyncio.wait_for(stopped, BOUND_S)
    await asyncio.sleep(0)
    assert not killed.done(), "stop_generating() must not resolve killed()"
    ctx.kill()
    await asyncio.wait_for(killed, BOUND_S)
    await asyncio.wait_for(ctx.killed(), BOUND_S)  # resolves at once now


async def test_kill_wakes_stopped_waiters() -> None:
    ctx = GenerateContext()
    stopped = asyncio.create_task(ctx.stopped())
    await asyncio.sleep(0)
    ctx.kill()
    await asyncio.wait_for(stopped, BOUND_S)


async def test_race_work_against_stopped() -> None:
    """The pattern an engine uses: race its own work against the cancel signal."""
    ctx = GenerateContext()
    work = asyncio.create_task(asyncio.sleep(3600))
    stop = asyncio.create_task(ctx.stopped())
    asyncio.get_running_loop().call_soon(ctx.stop_generating)
    done, _ = await asyncio.wait({work, stop}, timeout=BOUND_S, return_when="FIRST_COMPLETED")
    assert done == {stop}
    work.cancel()


def test_notify_first_token_calls_back_at_most_once() -> None:
    calls: list[int] = []
    ctx = GenerateContext(on_first_token=lambda: calls.append(1))
    assert not ctx.first_token_seen
    ctx.notify_first_token()
    ctx.notify_first_token()
    ctx.notify_first_token()
    assert calls == [1]
    assert ctx.first_token_seen


def test_notify_first_token_without_callback_is_a_noop() -> None:
    ctx = GenerateContext()
    ctx.notify_first_token()
    assert ctx.first_token_seen and not ctx.is_stopped()


def test_notify_first_token_after_stop_still_calls_once() -> None:
    calls: list[int] = []
    ctx = GenerateContext(on_first_token=lambda: calls.append(1))
    ctx.stop_generating()
    ctx.notify_first_token()
    ctx.notify_first_token()
    assert calls == [1]

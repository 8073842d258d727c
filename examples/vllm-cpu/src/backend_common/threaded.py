"""Bridges for engines that compute on their own threads (torch loops, C++ runtimes).

An engine whose forward passes run on a dedicated thread must hand each request's
results back to the event loop without blocking it, and that thread must see when the
request was cancelled. ``ThreadFeed`` is that bridge, one per request:

    feed = ThreadFeed(ctx)             # on the event loop, inside generate()
    core.submit(request, feed)         # the compute thread keeps the feed
    ...                                # compute thread: feed.put(item); feed.close()
    async for batch in feed:           # event loop: lists of items, in order
        ...

Who calls what, and from which thread:

* The event loop creates the feed (it captures the running loop), iterates it, and
  may ``cancel()`` it. ``watch(ctx)`` (or passing ``ctx`` to the constructor) starts one
  watcher task that cancels the feed when ``ctx`` is stopped or killed; ``aclose()``
  ends that watcher and is idempotent (the iterator calls it when it ends).
* Any thread calls ``put(item)``, ``close()`` and ``fail(exc)``. They never block on the
  loop: items go into a locked deque and at most one ``call_soon_threadsafe`` wake-up is
  in flight per feed, however many items arrive meanwhile (a lagging consumer gets
  them as one batch). After ``close``/``fail`` further puts are dropped.
* Any thread reads ``cancelled`` (a ``threading.Event`` underneath: no lock with the
  loop) to stop work for a request the client gave up; ``on_cancel(fn)`` registers a
  loop-side callback run once at cancellation (e.g. telling a batch manager to drop
  the request, which frees its KV blocks).

Iteration order: items put before ``close()`` are all delivered, then iteration ends;
after ``fail(exc)`` the remaining items are delivered, then ``exc`` is raised. A
cancellation ends iteration at once, dropping what was not yet taken: cancellation
wins over results already waiting (the stream then ends with a ``cancelled`` terminal,
whose usage counts what the engine actually streamed).

If the loop is already closed when the worker thread puts (the process is shutting
down), ``put`` returns ``False`` and nothing is raised on the worker thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

from .context import GenerateContext

__all__ = ["ThreadFeed"]

T = TypeVar("T")


class ThreadFeed(Generic[T]):
    """One request's items, produced on any thread, consumed on the event loop."""

    __slots__ = (
        "_loop",
        "_lock",
        "_items",
        "_closed",
        "_error",
        "_wake_pending",
        "_waiter",
        "_cancelled",
        "_cancel_callbacks",
        "_watcher",
    )

    def __init__(self, ctx: GenerateContext | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._items: deque[T] = deque()
        self._closed = False
        self._error: BaseException | None = None
        self._wake_pending = False
        self._waiter: asyncio.Future[None] | None = None
        self._cancelled = threading.Event()
        self._cancel_callbacks: list[Callable[[], object]] = []
        self._watcher: asyncio.Task[None] | None = None
        if ctx is not None:
            self.watch(ctx)

    # -- any thread ------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        """True once the consumer cancelled (safe to read from any thread)."""
        return self._cancelled.is_set()

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T) -> bool:
        """Queue ``item`` for the consumer. False (item dropped) once closed or cancelled."""
        return self._push(item, close=False, error=None)

    def put_many(self, items: list[T]) -> bool:
        """Queue several items with one wake-up."""
        with self._lock:
            if self._closed or self._cancelled.is_set():
                return False
            self._items.extend(items)
            wake = not self._wake_pending
            self._wake_pending = True
        return self._wake() if wake else True

    def close(self, item: T | None = None) -> bool:
        """Optionally queue a last ``item``, then end the stream after what is queued."""
        return self._push(item, close=True, error=None)

    def fail(self, error: BaseException) -> bool:
        """End the stream with ``error`` raised to the consumer after the queued items."""
        return self._push(None, close=True, error=error)

    def _push(self, item: T | None, *, close: bool, error: BaseException | None) -> bool:
        with self._lock:
            if self._closed or (self._cancelled.is_set() and not close):
                return False
            if item is not None and not self._cancelled.is_set():
                self._items.append(item)
            if close:
                self._closed = True
                self._error = error
            wake = not self._wake_pending
            self._wake_pending = True
        return self._wake() if wake else True

    def _wake(self) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._on_wake)
        except RuntimeError:  # the loop is closed: nobody is left to consume
            return False
        return True

    # -- event loop ------------------------------------------------------------------
    def _on_wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def watch(self, ctx: GenerateContext) -> None:
        """Cancel this feed when ``ctx`` is stopped (one watcher task; loop thread only)."""
        if self._watcher is not None:
            return
        if ctx.is_stopped():
            self.cancel()
            return

        async def _watch() -> None:
            await ctx.stopped()
            self.cancel()

        self._watcher = self._loop.create_task(_watch())

    def on_cancel(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` (sync, on the loop) once when the feed is cancelled."""
        if self._cancelled.is_set():
            callback()
        else:
            self._cancel_callbacks.append(callback)

    def cancel(self) -> None:
        """Consumer side: stop the stream now (also ends the watcher). Idempotent; loop only."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        with self._lock:
            self._items.clear()
        callbacks, self._cancel_callbacks = self._cancel_callbacks, []
        for callback in callbacks:
            callback()
        self._on_wake()
        self.aclose()

    async def get(self) -> list[T]:
        """Every item queued now, waiting for at least one; [] when the stream ended.

        Raises the ``fail`` error once the queued items are taken.
        """
        while True:
            if self._cancelled.is_set():
                return []
            with self._lock:
                if self._items:
                    batch = list(self._items)
                    self._items.clear()
                    return batch
                if self._closed:
                    error, self._error = self._error, None
                    if error is not None:
                        raise error
                    return []
            self._waiter = self._loop.create_future()
            try:
                # Re-check under the lock: a put between the check and here already woke.
                with self._lock:
                    ready = bool(self._items) or self._closed
                if not ready and not self._cancelled.is_set():
                    await self._waiter
            finally:
                self._waiter = None

    def aclose(self) -> None:
        """End the watcher task (idempotent); the feed keeps its state."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()

    async def __aiter__(self) -> AsyncIterator[list[T]]:
        try:
            while batch := await self.get():
                yield batch
        finally:
            self.aclose()

"""``RequestGuard``: release a request's engine resources on every exit path.

An engine acquires something per request (a scheduler slot, KV blocks, a
handle) and must give it back whether the stream finished, raised, was
cancelled, or was simply dropped by the consumer. In an async generator the
drop paths are ``aclose()`` (``GeneratorExit`` at the suspended ``yield``) and
garbage collection of a never-closed generator (the event loop's async-gen
finalizer, or ``__del__`` as the last resort). ``RequestGuard`` covers them all:

    async def generate(self, request, ctx):
        with RequestGuard(lambda: self.slots.release(ctx.id())):
            ...yield items...

``release`` runs exactly once, whatever happens; calling ``release()`` again
(or exiting twice) is a no-op. Use it as a sync or async context manager.

``release`` may be an async callback (``lambda: engine.abort(request_id)`` for an
engine whose cancel is a coroutine). ``async with`` awaits it on exit (also on
``aclose()``); sync exit paths (``with``, ``release()``, garbage collection) schedule
it as a task on the running loop, kept referenced until it finished. Without a running
loop the coroutine is closed and an error logged: it cannot run anywhere.

``ActiveRequests`` is an engine's set of in-flight requests built on it: ``generate`` wraps
its body in ``with self.active.track(ctx, release):``; the returned guard calls
``release`` once on every exit path and forgets the request. ``cleanup`` calls
``stop_all()`` so every open stream ends with a clean cancelled terminal rather than an
error when the engine goes away. Single event loop: all its methods are called from the
loop's thread, no locking needed.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .context import GenerateContext

__all__ = ["ActiveRequests", "RequestGuard"]

log = logging.getLogger(__name__)

# Release tasks scheduled from sync exit paths: referenced until done (the loop keeps
# only weak references to tasks).
_PENDING: set[asyncio.Task[Any]] = set()


async def _await_release(result: Awaitable[Any]) -> None:
    try:
        await result
    except Exception:
        log.exception("RequestGuard release callback failed")


class RequestGuard:
    __slots__ = ("_release", "_released", "__weakref__")

    def __init__(self, release: Callable[[], Any]) -> None:
        self._release: Callable[[], Any] | None = release
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def _take(self) -> Callable[[], Any] | None:
        """The callback to run, once: None when already released (or disarmed)."""
        if self._released:
            return None
        self._released = True
        fn, self._release = self._release, None
        return fn

    def release(self) -> None:
        """Run the release callback now (once). Exceptions are logged, never raised."""
        fn = self._take()
        try:
            result = fn() if fn is not None else None
            if inspect.isawaitable(result):
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    # No loop to run it on (a generator collected after its loop ended).
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
                    log.error("RequestGuard: async release callback dropped: no running loop")
                    return
                task = loop.create_task(_await_release(result))
                _PENDING.add(task)
                task.add_done_callback(_PENDING.discard)
        except Exception:
            log.exception("RequestGuard release callback failed")

    async def arelease(self) -> None:
        """Run the release callback now (once), awaiting it when it is async."""
        fn = self._take()
        try:
            result = fn() if fn is not None else None
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("RequestGuard release callback failed")

    def __enter__(self) -> RequestGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> RequestGuard:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.arelease()

    def __del__(self) -> None:
        # Last resort for a generator that was garbage collected without being closed.
        if not self._released:
            self.release()


class ActiveRequests:
    """An engine's in-flight requests, each tracked by a ``RequestGuard`` (module docstring)."""

    def __init__(self) -> None:
        # Keyed by a private counter, not by request id: ids come from the network and two
        # in-flight requests with the same id must still be tracked (and released) separately.
        self._keys = itertools.count()
        self._active: dict[int, GenerateContext] = {}

    def track(
        self, ctx: GenerateContext, release: Callable[[], object] | None = None
    ) -> RequestGuard:
        """Register ``ctx`` as active; the guard forgets it and calls ``release`` once."""
        key = next(self._keys)
        self._active[key] = ctx

        def _release() -> None:
            self._active.pop(key, None)
            if release is not None:
                release()

        return RequestGuard(_release)

    def __len__(self) -> int:
        return len(self._active)

    def request_ids(self) -> list[str]:
        return [ctx.id() for ctx in self._active.values()]

    def stop_all(self) -> int:
        """Ask every active stream to stop (each then yields a cancelled terminal)."""
        contexts = list(self._active.values())
        for ctx in contexts:
            ctx.stop_generating()
        return len(contexts)

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
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["RequestGuard"]

log = logging.getLogger(__name__)


class RequestGuard:
    __slots__ = ("_release", "_released", "__weakref__")

    def __init__(self, release: Callable[[], Any]) -> None:
        self._release: Callable[[], Any] | None = release
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Run the release callback now (once). Exceptions are logged, never raised."""
        if self._released:
            return
        self._released = True
        fn, self._release = self._release, None
        try:
            result = fn() if fn is not None else None
            if isinstance(result, Awaitable):
                # A coroutine callback cannot be awaited from a sync exit path; close it
                # so it is not leaked, and say so: release callbacks must be sync.
                close = getattr(result, "close", None)
                if close is not None:
                    close()
                log.error("RequestGuard release callback returned an awaitable; it must be sync")
        except Exception:
            log.exception("RequestGuard release callback failed")

    def __enter__(self) -> RequestGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> RequestGuard:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        # Last resort for a generator that was garbage collected without being closed.
        if not self._released:
            self.release()

"""The request servers' shared handler bookkeeping: one task per accepted request.

Both request servers (``tcp``, ``nats``) call ``HandlerTasks.dispatch(handle, *args)`` once
per accepted request, right after its ACK went out. A handler that returns an awaitable runs
as its own task, tracked until it ends; an exception (raised at once or by the task) is
logged and never reaches the server's read loop or connection. Closing a server leaves the
tasks running: the worker drains them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["HandlerTasks"]

log = logging.getLogger(__name__)


class HandlerTasks:
    """Running request-handler tasks of one server."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def tasks(self) -> frozenset[asyncio.Task[Any]]:
        """Handler tasks still running (for a worker that wants to await them on shutdown)."""
        return frozenset(self._tasks)

    def dispatch(
        self, handle: Callable[..., Awaitable[None] | None], where: str, *args: Any
    ) -> None:
        """Call ``handle(*args)``; run an awaitable result as a tracked task. Never raises."""
        try:
            result = handle(*args)
        except Exception:
            log.exception("request handler for %r failed", where)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("request handler failed", exc_info=exc)

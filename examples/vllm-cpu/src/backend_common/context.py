"""Per-request cancellation context handed to ``LLMEngine.generate``.

Who calls what:

* The worker creates one ``GenerateContext`` per request. When the frontend
  sends ``stop`` it calls ``stop_generating()``; on ``kill`` (client gone) it
  calls ``kill()``, which also stops. Shutdown and ``cleanup()`` paths use
  ``stop_generating()`` too.
* The engine polls ``is_stopped()`` between yields (or awaits ``stopped()`` in a
  race with its own work) and then yields a ``cancelled`` terminal.
* ``notify_first_token()`` is for decode workers whose first token becomes
  visible through a side channel; the framework fires it itself on the first
  item with tokens. It runs its callback at most once.

All methods are idempotent and must be called on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

__all__ = ["GenerateContext"]


class GenerateContext:
    __slots__ = (
        "_id",
        "_stopped",
        "_killed",
        "_stop_event",
        "_kill_event",
        "_first_token_cb",
        "_first_token_seen",
        "metadata",
        "trace_headers",
    )

    def __init__(
        self,
        request_id: str | None = None,
        *,
        metadata: dict[str, str] | None = None,
        on_first_token: Callable[[], None] | None = None,
        trace_headers: dict[str, str] | None = None,
    ) -> None:
        self._id = request_id or str(uuid.uuid4())
        self._stopped = False
        self._killed = False
        # Events are created lazily: most requests finish without anyone awaiting them.
        self._stop_event: asyncio.Event | None = None
        self._kill_event: asyncio.Event | None = None
        self._first_token_cb = on_first_token
        self._first_token_seen = False
        self.metadata: dict[str, str] = dict(metadata or {})
        self.trace_headers: dict[str, str] = dict(trace_headers or {})

    def id(self) -> str:
        return self._id

    def is_stopped(self) -> bool:
        return self._stopped

    def is_killed(self) -> bool:
        return self._killed

    async def stopped(self) -> None:
        if self._stopped:
            return
        if self._stop_event is None:
            self._stop_event = asyncio.Event()
        await self._stop_event.wait()

    async def killed(self) -> None:
        if self._killed:
            return
        if self._kill_event is None:
            self._kill_event = asyncio.Event()
        await self._kill_event.wait()

    def stop_generating(self) -> None:
        """Graceful: stop producing new items; what was produced stays valid."""
        if self._stopped:
            return
        self._stopped = True
        if self._stop_event is not None:
            self._stop_event.set()

    stop = stop_generating

    def kill(self) -> None:
        """Abort: stop at once and do not drain. Implies ``stop_generating()``."""
        if not self._killed:
            self._killed = True
            if self._kill_event is not None:
                self._kill_event.set()
        self.stop_generating()

    def notify_first_token(self) -> None:
        if self._first_token_seen:
            return
        self._first_token_seen = True
        if self._first_token_cb is not None:
            self._first_token_cb()

    @property
    def first_token_seen(self) -> bool:
        return self._first_token_seen

    def __repr__(self) -> str:
        state = "killed" if self._killed else "stopped" if self._stopped else "live"
        return f"GenerateContext({self._id}, {state})"

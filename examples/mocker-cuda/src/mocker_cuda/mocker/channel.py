"""A request's token channel: the scheduler appends, the request's stream drains.

One ``TokenChannel`` per request, created with its ``Sequence``. It replaces an
``asyncio.Queue`` of per-token objects: the scheduler's hot loop only appends an
int to a deque (``push``), and the stream takes the oldest token (``take_one``,
the default: one token per item) or, with ``--merge-lagging-tokens``, every token
that arrived since its last look in one go (``take``).

Who calls what, all on the event loop's thread:

* the scheduler: ``push(token, finish)`` once per sampled token (``finish`` set
  on the last one), ``close()`` when it stops before the request finished;
* the engine: ``interrupt()`` when the request's context is stopped, which
  only wakes a waiting stream so that it re-checks ``ctx.is_stopped()``;
  the stream itself: ``await wait()`` (bound it with ``asyncio.timeout`` to
  wait for a limited time), then ``take_one()`` or ``take()``.

Invariants: tokens are taken in push order, each exactly once; ``finish`` is set
at most once and only together with the last token; ``ready`` is true while
there are tokens to take or the channel is closed, and ``wait()`` returns at
once then. At most one coroutine waits at a time (the request's stream).
"""

from __future__ import annotations

import asyncio
from collections import deque

from backend_common.types import FinishReason

__all__ = ["TokenChannel"]


class TokenChannel:
    __slots__ = ("_tokens", "finish", "closed", "_waiter")

    def __init__(self) -> None:
        self._tokens: deque[int] = deque()
        self.finish: FinishReason | None = None  # set with the request's last token
        self.closed = False  # the scheduler stopped before the request finished
        self._waiter: asyncio.Future[None] | None = None

    # -- producer side (scheduler, engine) ---------------------------------------
    def push(self, token: int, finish: FinishReason | None = None) -> None:
        self._tokens.append(token)
        if finish is not None:
            self.finish = finish
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def interrupt(self) -> None:
        """Wake the waiting stream without data (its context was stopped)."""
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- consumer side (the request's stream) ------------------------------------
    @property
    def ready(self) -> bool:
        return bool(self._tokens) or self.closed

    def __len__(self) -> int:
        return len(self._tokens)

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def take(self) -> list[int]:
        """Every token not taken yet, oldest first (possibly none)."""
        tokens = list(self._tokens)
        self._tokens.clear()
        return tokens

    def take_one(self) -> list[int]:
        """The oldest token not taken yet, as a one-element list (empty when there is none)."""
        return [self._tokens.popleft()] if self._tokens else []

    async def wait(self) -> None:
        """Until the channel is ready or ``interrupt()`` is called (bound it with a timeout)."""
        if self._tokens or self.closed:
            return
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

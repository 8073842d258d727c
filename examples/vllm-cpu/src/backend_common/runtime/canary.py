"""The health canary on an idle worker, as Dynamo 1.6.1's health-check manager runs it.

With ``DYN_HEALTH_CHECK_ENABLED`` (``WorkerConfig.health_check_enabled``), ``IdleCanary``
sends the canary payload through the engine whenever the worker has seen no request for
``DYN_CANARY_WAIT_TIME`` seconds (``canary_wait_time``, default 10), each bounded by
``DYN_HEALTH_CHECK_REQUEST_TIMEOUT`` (``health_check_request_timeout``, default 3).
Traffic is proof of life: while requests keep arriving no canary runs. The latest result
is what ``/health`` reports (``last``); before the first canary the worker counts as
healthy.

Owned by the worker: ``start()`` once the worker serves, ``close()`` when shutdown begins.
``probe`` runs one canary and returns ``(ok, detail)``; ``last_activity`` returns the
monotonic time of the latest admitted request (0 if none).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

__all__ = ["CanaryResult", "IdleCanary"]

log = logging.getLogger(__name__)


class CanaryResult:
    __slots__ = ("at", "detail", "ok")

    def __init__(self, ok: bool, detail: str, at: float) -> None:
        self.ok = ok
        self.detail = detail
        self.at = at  # time.monotonic() when it finished


class IdleCanary:
    def __init__(
        self,
        probe: Callable[[float], Awaitable[tuple[bool, str]]],
        last_activity: Callable[[], float],
        *,
        wait_s: float,
        timeout_s: float,
    ) -> None:
        self._probe = probe
        self._last_activity = last_activity
        self.wait_s = max(wait_s, 0.01)
        self.timeout_s = timeout_s
        self.last: CanaryResult | None = None
        self.runs = 0
        self._started = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _idle_since(self) -> float:
        last_canary = self.last.at if self.last is not None else 0.0
        return max(self._last_activity(), last_canary, self._started)

    async def _loop(self) -> None:
        self._started = time.monotonic()
        while True:
            due = self._idle_since() + self.wait_s
            now = time.monotonic()
            if now < due:
                await asyncio.sleep(due - now)
                continue
            ok, detail = await self._probe(self.timeout_s)
            self.runs += 1
            if not ok and (self.last is None or self.last.ok):
                log.warning("health canary failed on an idle worker: %s", detail)
            elif ok and self.last is not None and not self.last.ok:
                log.info("health canary passes again")
            self.last = CanaryResult(ok, detail, time.monotonic())

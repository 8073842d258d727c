"""The worker's health: the canary payload, the canary itself, the idle canary, ``/health``.

The canary's contract: docs/contract.md#health-canary.

Payload. ``WorkerHealth.resolve`` (once, by the worker, after ``setup_metrics``) picks the
canary request by precedence, as Dynamo's workers do:

1. the override ``WorkerConfig.health_check_payload`` (the ``--health-check-payload`` flag,
   which itself defaults to ``DYN_HEALTH_CHECK_PAYLOAD``; both read in ``args.py``, which
   drops a value that does not parse, with a warning);
2. ``await engine.health_check_payload()``.

The first one that is set wins (an operator payload fully replaces the engine's, even
``{}``). An override built in code that is not a JSON object is ignored with a warning and
the engine's payload is used; an engine payload that is not a JSON object (or a hook that
raises) disables the canary with a warning. The winner is marked as a probe
(``types.mark_as_probe``: ``_HEALTH_CHECK: true``, overriding a ``false``), which makes
``request.is_probe`` true in ``generate``. ``None`` means no canary.

Canary. ``run_canary`` sends the payload through ``engine.generate`` once, bounded by
``health_check_request_timeout``: a terminal that is not an error passes; an error terminal,
a stream without a terminal, an exception or the timeout fails it.

Idle canary. With ``DYN_HEALTH_CHECK_ENABLED`` (``WorkerConfig.health_check_enabled``),
``IdleCanary`` runs the canary whenever the worker has seen no request for
``DYN_CANARY_WAIT_TIME`` seconds (``canary_wait_time``, default 10). Traffic is proof of life:
while requests keep arriving no canary runs. The worker starts it once it serves and stops it
when shutdown begins.

``/health`` (``WorkerHealth.report``, the status server's callback). Not ready (503,
``notready``) unless the worker serves: from the moment its records are registered until the
moment draining starts. While it serves: healthy without a canary payload; with the idle
canary, its latest result (healthy before the first run); otherwise one canary per call.

``build_health_check_payload(bos_token_id)`` is the usual engine-side payload: one token,
greedy, ``max_tokens=1``, ``ignore_eos``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..context import GenerateContext
from ..errors import from_exception
from ..streams import close_stream
from ..types import FinishReason, PreprocessedRequest, mark_as_probe

if TYPE_CHECKING:
    from ..config import WorkerConfig
    from ..engine import LLMEngine

__all__ = [
    "CanaryResult",
    "IdleCanary",
    "WorkerHealth",
    "build_health_check_payload",
    "resolve_health_check_payload",
    "run_canary",
    "stamp_canary_marker",
]

log = logging.getLogger(__name__)

Probe = Callable[[float], Awaitable[tuple[bool, str]]]


# -- the payload ---------------------------------------------------------------------------
def build_health_check_payload(
    bos_token_id: int = 1, *, extras: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One-token greedy canary starting from ``bos_token_id``, plus ``extras``; marked."""
    payload: dict[str, Any] = {
        "token_ids": [int(bos_token_id)],
        "stop_conditions": {"max_tokens": 1, "ignore_eos": True},
        "sampling_options": {"temperature": 0.0},
    }
    payload.update(extras or {})
    return mark_as_probe(payload)


def stamp_canary_marker(payload: Any) -> dict[str, Any] | None:
    """``payload`` marked as a probe; None (and a warning) if it is not an object."""
    if payload is None:
        return None
    if not isinstance(payload, dict):
        log.warning("health_check_payload override is not a JSON object; canary disabled")
        return None
    return mark_as_probe(payload)


async def resolve_health_check_payload(
    override: dict[str, Any] | None, engine: LLMEngine
) -> dict[str, Any] | None:
    """The canary payload by precedence override > engine (see the module docstring)."""
    if override is not None:
        if isinstance(override, dict):
            return stamp_canary_marker(override)
        log.warning(
            "health_check_payload override is not a JSON object; "
            "using the engine's health_check_payload()"
        )
    try:
        payload = await engine.health_check_payload()
    except Exception:  # noqa: BLE001 - a broken hook disables the canary, not the worker
        log.warning("engine.health_check_payload() failed; canary disabled", exc_info=True)
        return None
    return stamp_canary_marker(payload)


# -- one canary ----------------------------------------------------------------------------
async def run_canary(
    engine: LLMEngine,
    payload: dict[str, Any],
    timeout: float,  # noqa: ASYNC109 - the bound is the canary's own setting
) -> tuple[bool, str]:
    """Send ``payload`` through ``engine.generate`` once: ``(passed, detail)``. Never raises."""
    try:
        request = PreprocessedRequest.from_dict(dict(payload))
    except Exception as exc:  # noqa: BLE001
        return False, f"invalid canary payload: {exc}"
    ctx = GenerateContext()

    async def one() -> tuple[bool, str]:
        stream = engine.generate(request, ctx)
        try:
            async for item in stream:
                if item.finish_reason is FinishReason.ERROR:
                    return False, f"error terminal: {item.error_message}"
                if item.finish_reason is not None:
                    return True, "ok"
            return False, "stream ended without a terminal"
        finally:
            await close_stream(stream)

    try:
        return await asyncio.wait_for(one(), timeout)
    except TimeoutError:
        ctx.stop_generating()
        return False, f"timed out after {timeout:g}s"
    except Exception as exc:  # noqa: BLE001
        return False, str(from_exception(exc))


# -- the canary on an idle worker ----------------------------------------------------------
class CanaryResult:
    __slots__ = ("at", "detail", "ok")

    def __init__(self, ok: bool, detail: str, at: float) -> None:
        self.ok = ok
        self.detail = detail
        self.at = at  # time.monotonic() when it finished


class IdleCanary:
    """Runs ``probe`` whenever ``last_activity()`` (monotonic, 0 if none) is ``wait_s`` old.

    ``start()`` once, on the event loop; ``close()`` cancels it (idempotent). ``last`` is the
    latest result, None before the first run.
    """

    def __init__(
        self,
        probe: Probe,
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
            if not ok and (self.last is None or self.last.ok):
                log.warning("health canary failed on an idle worker: %s", detail)
            elif ok and self.last is not None and not self.last.ok:
                log.info("health canary passes again")
            self.last = CanaryResult(ok, detail, time.monotonic())


# -- the worker's health -------------------------------------------------------------------
class WorkerHealth:
    """The canary payload, the idle canary and the ``/health`` body of one worker.

    Owned by the worker: ``resolve`` once at start-up, ``start_idle_canary`` once it serves,
    ``stop_idle_canary`` when shutdown begins (and again, harmlessly, at the end).
    ``report`` is called by the status server, once per ``GET /health``.
    """

    def __init__(self, engine: LLMEngine, config: WorkerConfig) -> None:
        self._engine = engine
        self._enabled = config.health_check_enabled
        self._wait_s = config.canary_wait_time
        self._timeout_s = config.health_check_request_timeout
        self._override = config.health_check_payload
        self.payload: dict[str, Any] | None = None
        self._idle: IdleCanary | None = None

    async def resolve(self) -> None:
        """Pick the canary payload (see the module docstring)."""
        self.payload = await resolve_health_check_payload(self._override, self._engine)

    async def probe(self, timeout: float) -> tuple[bool, str]:  # noqa: ASYNC109
        """One canary with the resolved payload (``run_canary``)."""
        if self.payload is None:
            return True, "disabled"
        return await run_canary(self._engine, self.payload, timeout)

    def start_idle_canary(self, last_activity: Callable[[], float]) -> None:
        """Start the idle canary when it is enabled and there is a payload."""
        if self._enabled and self.payload is not None and self._idle is None:
            self._idle = IdleCanary(
                self.probe, last_activity, wait_s=self._wait_s, timeout_s=self._timeout_s
            )
            self._idle.start()

    async def stop_idle_canary(self) -> None:
        if self._idle is not None:
            await self._idle.close()

    async def report(self, serving: bool, state: str) -> tuple[bool, dict[str, Any]]:
        """``(ok, body)`` of ``/health``; ``serving``: registered and not draining."""
        if not serving:
            return False, {"status": "notready", "state": state}
        if self.payload is None:
            return True, {"status": "healthy", "canary": "disabled"}
        if self._idle is not None:
            # The canary runs by itself on an idle worker; report its latest result.
            last = self._idle.last
            if last is None:
                return True, {"status": "healthy", "canary": "not run yet"}
            age = time.monotonic() - last.at
            body = {"canary": last.detail, "canary_age_s": round(age, 3)}
            return last.ok, {"status": "healthy" if last.ok else "unhealthy", **body}
        ok, detail = await self.probe(self._timeout_s)
        return ok, {"status": "healthy" if ok else "unhealthy", "canary": detail}

"""The worker's lifecycle phase: one value that says what the worker is doing, plus ``forced``.

docs/architecture.md#lifecycle. ``Lifecycle`` is owned by the worker; every transition is
one method here, so the phase is the only state the rest of the worker reads:

=============  ============================================================================
phase          entered when
=============  ============================================================================
INIT           the worker was built (discovery connecting)
STARTING       ``engine.start()`` is called; from here on ``cleanup()`` is owed
SERVING        the records are registered: ``/health`` ready, lease losses re-registered
DRAINING       the first shutdown signal (also during STARTING: the worker never registers)
STOPPING       admission closes, just before ``engine.cleanup()``
STOPPED        cleanup done (or nothing was started)
START_FAILED   ``engine.start()`` raised (``cleanup()`` still runs, once)
=============  ============================================================================

``forced`` is set by a second shutdown signal: the remaining waits are skipped.
Admission (``admitting``) is open in every phase but STOPPING, STOPPED and START_FAILED:
the 1.6.1 frontend does not retry a refused request, so the worker refuses only once it can
no longer serve. All methods run on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import enum

__all__ = ["Lifecycle", "Phase"]


class Phase(enum.Enum):
    INIT = "init"
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPING = "stopping"
    STOPPED = "stopped"
    START_FAILED = "start_failed"


_LEAVING = frozenset({Phase.DRAINING, Phase.STOPPING, Phase.STOPPED, Phase.START_FAILED})
_CLOSED = frozenset({Phase.STOPPING, Phase.STOPPED, Phase.START_FAILED})


class Lifecycle:
    """The phase and the ``forced`` flag; see the module docstring for the transitions."""

    def __init__(self) -> None:
        self.phase = Phase.INIT
        self.forced = False
        self._leave = asyncio.Event()  # set on entering DRAINING (or STOPPED from INIT)

    @property
    def serving(self) -> bool:
        return self.phase is Phase.SERVING

    @property
    def leaving(self) -> bool:
        """Shutdown started (or start-up failed): never register (again)."""
        return self.phase in _LEAVING

    @property
    def admitting(self) -> bool:
        return self.phase not in _CLOSED

    @property
    def cleanup_owed(self) -> bool:
        """``engine.start()`` was called and ``cleanup()`` has not run."""
        return self.phase not in (Phase.INIT, Phase.STOPPING, Phase.STOPPED)

    def request_stop(self) -> None:
        """First shutdown signal: INIT -> STOPPED (nothing to clean up), STARTING or
        SERVING -> DRAINING; in any later phase nothing changes."""
        if self.phase is Phase.INIT:
            self.phase = Phase.STOPPED
        elif self.phase in (Phase.STARTING, Phase.SERVING):
            self.phase = Phase.DRAINING
        self._leave.set()

    def begin_start(self) -> bool:
        """INIT -> STARTING; False when shutdown was requested first (then do not start)."""
        if self.phase is not Phase.INIT:
            return False
        self.phase = Phase.STARTING
        return True

    def start_failed(self) -> None:
        self.phase = Phase.START_FAILED

    def begin_serving(self) -> bool:
        """STARTING -> SERVING once registered; False when a signal came first (DRAINING)."""
        if self.phase is not Phase.STARTING:
            return False
        self.phase = Phase.SERVING
        return True

    async def wait_leaving(self) -> None:
        """Return once the first shutdown signal arrived."""
        await self._leave.wait()

    def begin_stopping(self) -> None:
        """Admission closes: ``engine.cleanup()`` is next."""
        self.phase = Phase.STOPPING

    def stopped(self) -> None:
        self.phase = Phase.STOPPED

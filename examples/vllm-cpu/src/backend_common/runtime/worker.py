"""The worker lifecycle: startup, serve, graceful shutdown.

The lifecycle and the measured reasons for the shutdown order:
docs/architecture.md#lifecycle and docs/architecture.md#shutdown-sequence.

``Worker(engine, config).run()`` is the whole life of a backend process, in
the order Dynamo's workers follow:

The phase (``lifecycle.Phase``) says where it is; a second signal sets ``forced``.

startup
    signal handlers -> connect discovery -> ``engine.start(worker_id)`` ->
    ``setup_metrics`` -> KV routing hooks -> health canary payload -> adapter ->
    request plane and status server up -> model card and endpoint registered ->
    "Serving ...".
serve
    the request plane (``transport.plane.RequestPlane``) hands each accepted
    request to the ``EngineAdapter``.
shutdown (SIGTERM/SIGINT, first signal)
    admission stays open until the engine is cleaned up: every request that
    reaches the worker is served, because the 1.6.1 frontend (default flags)
    does not retry a refused one.
    1. delete the Model record(s) (``v1/mdc/...``): the frontend stops routing
       new requests here, and nothing in flight is touched (no Endpoint removal
       event yet); ``/health`` reports not ready;
    2. grace period (``config.graceful_shutdown_grace_period``, default 5 s,
       at least ``WITHDRAW_GAP_S``), then until no request arrived for
       ``QUIET_S``: requests that raced the withdrawal are served and their
       response streams connect;
    3. delete the Endpoint record and the rest (lease revoked); the frontend
       cancels still-connecting streams of a removed instance, and by now there
       are none;
    4. ``engine.drain()``;
    5. wait for in-flight streams up to ``config.graceful_shutdown_timeout``
       (default 30 s); streams still running then, and any request that arrives
       after it, are cancelled and end with a clean ``cancelled`` terminal,
       never a cut socket;
    6. admission closed, ``engine.cleanup()`` exactly once; transports closed;
       exit 0.
    Each is a named step (``Worker._shutdown_steps``); the deadline message names the step
    that was running.

``cleanup()`` runs exactly once if ``start()`` was called, also when it raised
or when registration failed; never when the process stopped before ``start``.
A signal during ``start()`` is handled once it returns: no registration, cleanup.
A second signal during shutdown skips the remaining waits.

Overall deadline: from the first signal, grace + drain + cleanup budgets
(``DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS`` 5, ``DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT`` 30,
``DYN_WORKER_SHUTDOWN_CLEANUP_TIMEOUT_SECS`` = the drain timeout) plus the fixed steps above
(``FIXED_SHUTDOWN_STEPS_S``). When it passes (a ``cleanup()`` stuck in an NCCL teardown,
say), a timer thread logs what shutdown was waiting for and exits with
``SHUTDOWN_DEADLINE_EXIT_CODE`` (124), whatever the event loop is doing.

Engine code that calls ``loop.add_signal_handler(SIGTERM|SIGINT, ...)`` is ignored with a
warning while the worker runs (as in Dynamo 1.6.1); handlers installed with
``signal.signal`` during ``start()`` are replaced by the worker's when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..config import EngineConfig, WorkerConfig
from ..discovery import create_discovery
from ..discovery.base import (
    MDC_BUCKET,
    Discovery,
    endpoint_record,
    instance_key,
    model_key,
    model_record,
)
from ..engine import LLMEngine
from ..errors import from_exception
from ..transport.plane import RequestPlane, request_plane_for
from .adapter import EngineAdapter
from .engine_metrics import scrape_registry
from .health import WorkerHealth
from .kv_events.plane import EventPlane
from .kv_events.routing import setup_kv_routing
from .lifecycle import Lifecycle
from .metrics import WorkerMetrics
from .modelcard import build_model_card
from .status import StatusServer
from .tracing import GenerateTracer

__all__ = ["Worker"]

log = logging.getLogger(__name__)

# Shortest time between withdrawing the Model record and the Endpoint record, whatever the grace
# period: the frontend needs a moment to stop routing (measured: 0 s gives 1 failed request in
# 1220; see docs/architecture.md#shutdown-sequence).
WITHDRAW_GAP_S = 0.1
# The Endpoint record is withdrawn only once no request arrived for this long (bounded by
# QUIET_MAX_WAIT_S), so no response stream is still connecting when the frontend sees the removal.
QUIET_S = 0.05
QUIET_MAX_WAIT_S = 2.0
# After the shutdown deadline: how long streams (and late arrivals) get to end after cancellation.
CANCEL_FLUSH_S = 5.0
# Exit code when the overall shutdown deadline passes. Dynamo 1.6.1 calls exit(911), which the
# OS truncates to 143 (911 % 256): the code of a process killed by SIGTERM. 124 ("timed out",
# as coreutils' timeout) cannot be mistaken for that, nor for 1 (start-up failed) or 2 (args).
SHUTDOWN_DEADLINE_EXIT_CODE = 124
# Fixed waits of this worker's shutdown outside the configured budgets (QUIET_MAX_WAIT_S and
# CANCEL_FLUSH_S); part of the overall deadline so that they can never trigger it alone.
FIXED_SHUTDOWN_STEPS_S = QUIET_MAX_WAIT_S + CANCEL_FLUSH_S


def _guard_loop_signal_handlers(loop: asyncio.AbstractEventLoop) -> bool:
    """Keep SIGTERM/SIGINT with the worker while it runs, as Dynamo 1.6.1's worker does.

    Engine code that calls ``loop.add_signal_handler(SIGTERM|SIGINT, ...)`` (some engines
    do in ``start()``) would silently replace the worker's graceful shutdown; such calls are
    ignored with a warning. Other signals pass through. False if the loop cannot be wrapped.
    """
    original = loop.add_signal_handler
    owned = frozenset({signal.SIGINT, signal.SIGTERM})

    def add_signal_handler(sig: int, callback: Any, *args: Any) -> None:
        if sig in owned:
            log.warning(
                "Suppressed engine loop.add_signal_handler(%s); the worker owns graceful "
                "shutdown (do teardown in cleanup())",
                signal.Signals(sig).name,
            )
            return None
        return original(sig, callback, *args)

    try:
        loop.add_signal_handler = add_signal_handler  # type: ignore[method-assign,assignment]
    except AttributeError:
        return False
    return True


Step = tuple[str, Callable[[], Awaitable[None]]]


@dataclass
class _Services:
    """What the worker connects at start-up and closes at the end, in this order."""

    request_plane: RequestPlane | None = None
    status: StatusServer | None = None
    events: EventPlane | None = None
    discovery: Discovery | None = None

    async def close(self) -> None:
        for service in (self.request_plane, self.status, self.events, self.discovery):
            if service is None:
                continue
            try:
                await asyncio.wait_for(service.close(), 5.0)
            except Exception:  # noqa: BLE001
                log.debug("closing a transport failed", exc_info=True)


class Worker:
    """One backend process's life: ``run()`` once. See the module docstring."""

    def __init__(self, engine: LLMEngine, config: WorkerConfig) -> None:
        self.engine = engine
        self.config = config
        self.lifecycle = Lifecycle()
        self.health = WorkerHealth(engine, config)
        self.instance_id = 0
        self.engine_config: EngineConfig | None = None
        self.metrics: WorkerMetrics | None = None
        self.adapter: EngineAdapter | None = None
        self._services = _Services()
        self._card: dict[str, Any] | None = None
        # Monotonic time of the latest admitted request: the idle canary and the quiet wait.
        self._last_admit = 0.0
        # The step running now (the shutdown deadline's message names it).
        self._step = "startup"
        # Armed by the first shutdown signal.
        self._deadline_timer: threading.Timer | None = None
        self._drain_started: float | None = None  # for the drain-time metric

    # -- public --------------------------------------------------------------------
    def request_shutdown(self) -> None:
        if self._deadline_timer is None:
            log.info("shutdown requested; running graceful shutdown")
            self._arm_deadline()
            self.lifecycle.request_stop()
        else:
            log.warning("second shutdown signal: skipping the remaining waits")
            self.lifecycle.forced = True

    async def run(self) -> int:
        """Run until shut down; return the process exit code."""
        loop = asyncio.get_running_loop()
        self._install_signal_handlers(loop)
        guarded = _guard_loop_signal_handlers(loop)
        try:
            return await self._run()
        finally:
            await self._walk(
                [
                    ("the idle canary", self.health.stop_idle_canary),
                    ("engine.cleanup()", self._cleanup_once),
                    ("closing transports", self._services.close),
                ]
            )
            if guarded:
                with contextlib.suppress(AttributeError):
                    del loop.add_signal_handler  # the loop's own method again
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.remove_signal_handler(sig)
                except (NotImplementedError, RuntimeError):
                    pass
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        add = type(loop).add_signal_handler  # the loop's method, past any guard
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                add(loop, sig, self.request_shutdown)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass

    async def _walk(self, steps: list[Step]) -> None:
        """Run ``steps`` in order; each one's name is the current step while it runs."""
        for name, step in steps:
            self._step = name
            await step()

    # -- shutdown deadline -----------------------------------------------------------------
    def shutdown_deadline(self) -> float:
        """Seconds from the first signal to a forced exit: grace + drain + cleanup budgets
        plus this worker's fixed shutdown steps (see ``FIXED_SHUTDOWN_STEPS_S``)."""
        cfg = self.config
        drain = cfg.graceful_shutdown_timeout
        cleanup = cfg.graceful_shutdown_cleanup_timeout
        if cleanup is None:
            cleanup = drain
        grace = max(cfg.graceful_shutdown_grace_period, WITHDRAW_GAP_S)
        return grace + drain + cleanup + FIXED_SHUTDOWN_STEPS_S

    def _arm_deadline(self) -> None:
        deadline = self.shutdown_deadline()
        log.debug("graceful shutdown started; deadline %.1fs", deadline)
        timer = threading.Timer(deadline, self._deadline_passed, args=(deadline,))
        timer.daemon = True
        timer.start()
        self._deadline_timer = timer

    def _deadline_passed(self, deadline: float) -> None:
        """Runs on the timer thread, so that an event loop blocked in engine code cannot
        hold the process: log what shutdown was waiting for, then exit at once."""
        waiting_for = self._step
        if self.adapter is not None and self.adapter.active:
            waiting_for += f" ({len(self.adapter.active)} stream(s) in flight)"
        message = (
            f"Graceful shutdown exceeded {deadline:.1f}s while waiting for {waiting_for}; "
            f"force-exiting with code {SHUTDOWN_DEADLINE_EXIT_CODE}"
        )
        log.error(message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(SHUTDOWN_DEADLINE_EXIT_CODE)

    # -- startup ---------------------------------------------------------------------
    async def _run(self) -> int:
        try:
            await self._walk([("discovery", self._connect_discovery)])
        except Exception as exc:  # noqa: BLE001
            return self._fatal("discovery", exc)
        if not self.lifecycle.begin_start():
            log.info("Shutdown signal observed before engine.start(); exiting cleanly")
            return 0

        started = time.monotonic()
        try:
            await self._walk([("engine.start()", self._start_engine)])
        except Exception as exc:  # noqa: BLE001
            self.lifecycle.start_failed()
            return self._fatal("engine.start", exc)
        load_time = time.monotonic() - started
        # An engine may have replaced the worker's handlers with signal.signal: take them back.
        self._install_signal_handlers(asyncio.get_running_loop())
        if self.lifecycle.leaving:
            # Never register a worker that is already leaving; cleanup runs once in run().
            log.info("Shutdown signal observed during engine.start(); not registering")
            return 0
        assert self.engine_config is not None
        if not self.engine_config.model:
            return self._fatal("engine.start", ValueError("EngineConfig.model is empty"))
        log.info("engine started in %.2fs", load_time)

        try:
            self._step = "startup"
            await self._setup_observability(load_time)
            self.adapter = self._build_adapter()
            await self._start_request_plane()
            await self._register()
        except Exception as exc:  # noqa: BLE001
            return self._fatal("startup", exc)

        if self.lifecycle.begin_serving():
            cfg = self.config
            log.info(
                "Serving %s on %s.%s.%s (instance %x)",
                cfg.display_name(self.engine_config),
                cfg.namespace,
                cfg.component,
                cfg.endpoint,
                self.instance_id,
            )
            self.health.start_idle_canary(lambda: self._last_admit)
        self._step = "a shutdown signal"
        await self.lifecycle.wait_leaving()
        await self._walk(self._shutdown_steps())
        return 0

    async def _connect_discovery(self) -> None:
        discovery = self._services.discovery = create_discovery(self.config)
        await discovery.connect()
        self.instance_id = discovery.instance_id

    async def _start_engine(self) -> None:
        self.engine_config = await self.engine.start(self.instance_id)

    def _fatal(self, stage: str, exc: BaseException) -> int:
        err = from_exception(exc)
        log.error("%s failed: %s", stage, err)
        print(f"error: {stage} failed: {err}", file=sys.stderr)
        return 1

    async def _setup_observability(self, load_time: float) -> None:
        """Metrics (the engine's on the same registry), KV routing hooks, the canary payload."""
        cfg, ec = self.config, self.engine_config
        assert ec is not None
        self.metrics = WorkerMetrics(
            namespace=cfg.namespace,
            component=cfg.component,
            endpoint=cfg.endpoint,
            model=ec.model,
            model_name=cfg.display_name(ec),
            worker_id=self.instance_id,
            extra_labels=cfg.metrics_labels,
        )
        self.metrics.set_model_load_time(load_time)
        await self.engine.setup_metrics(self.metrics.registry)
        if cfg.enable_kv_routing:
            self._services.events = await setup_kv_routing(
                self.engine, cfg, ec, self.instance_id, self.metrics.registry, self.metrics.labels
            )
        await self.health.resolve()

    def _build_adapter(self) -> EngineAdapter:
        cfg, ec = self.config, self.engine_config
        assert ec is not None
        return EngineAdapter(
            self.engine,
            mode=cfg.disaggregation_mode,
            metrics=self.metrics,
            engine_config=ec,
            validate=cfg.debug_validate,
            stream_timeout=cfg.engine_stream_timeout,
            tracer=GenerateTracer.create(
                cfg.tracing,
                cfg.disaggregation_mode,
                ec.model,
                cfg.otel_service_name,
                cfg.otel_exporter_protocol,
            ),
        )

    async def _start_request_plane(self) -> None:
        cfg = self.config
        assert self.adapter is not None
        plane = self._services.request_plane = request_plane_for(
            cfg, admit=self._admission_refusal, handle=self.adapter.handle
        )
        await plane.start(self.instance_id)
        if cfg.system_port is not None:
            status = self._services.status = StatusServer(
                cfg.system_host,
                cfg.system_port,
                registry=(
                    scrape_registry(
                        self.metrics.registry,
                        self.metrics.labels,
                        multiproc_dir=cfg.prometheus_multiproc_dir,
                    )
                    if self.metrics
                    else None
                ),
                health=self._health_report,
            )
            await status.start()

    async def _health_report(self) -> tuple[bool, dict[str, Any]]:
        """``/health``: ready only while serving (registered, not draining); see ``health``."""
        return await self.health.report(self.lifecycle.serving, self.lifecycle.phase.value)

    # -- registration ------------------------------------------------------------------
    def _records(self, instance_id: int) -> list[tuple[str, dict[str, Any]]]:
        cfg = self.config
        ns, comp, ep = cfg.namespace, cfg.component, cfg.endpoint
        plane, events = self._services.request_plane, self._services.events
        assert plane is not None and self._card is not None
        return [
            *(events.records(instance_id) if events is not None else []),
            (
                model_key(ns, comp, ep, instance_id),
                model_record(ns, comp, ep, instance_id, self._card),
            ),
            (
                instance_key(ns, comp, ep, instance_id),
                endpoint_record(
                    ns,
                    comp,
                    ep,
                    instance_id,
                    plane.transport(instance_id),
                    device_type=None,
                    # The frontend encodes request bodies (and we encode response items) with
                    # the codec the Endpoint record advertises: JSON by default.
                    codec=cfg.request_plane_codec,
                ),
            ),
        ]

    async def _register(self) -> None:
        discovery, status = self._services.discovery, self._services.status
        assert discovery is not None and self.engine_config is not None
        base_url = status.base_url if status is not None else None
        card = build_model_card(self.config, self.engine_config, base_url=base_url)
        self._card = card.card
        if status is not None:
            status.set_files(card.files_prefix, card.files)
        discovery.on_reregistered = self._reregister
        for key, value in self._records(self.instance_id):
            await discovery.put(key, value)

    async def _reregister(self, new_id: int) -> None:
        if self.lifecycle.leaving:
            # Leaving anyway: re-registering would make the frontend route here again.
            log.warning("discovery lease was lost during shutdown; not re-registering")
            return
        log.warning("discovery lease was lost; re-registering as instance %x", new_id)
        self.instance_id = new_id
        discovery, plane = self._services.discovery, self._services.request_plane
        assert discovery is not None and plane is not None
        await plane.serve_instance(new_id)
        for key, value in self._records(new_id):
            await discovery.put(key, value)

    # -- admission --------------------------------------------------------------------
    # Open from the request plane's start until just before engine.cleanup(), shutdown included:
    # a refusal ("Server unavailable") is not retried by the 1.6.1 frontend with its default
    # flags, so it would be a client-visible error. Shutdown stops the routing via discovery.
    # (The TCP plane refuses frames for another endpoint itself.)
    def _admission_refusal(self) -> str | None:
        """Why a request for this endpoint is refused now, or None to accept it.

        Called by the request plane once per request, before its ACK; never blocks.
        """
        if not self.lifecycle.admitting:
            return "Server unavailable: worker is shutting down"
        self._last_admit = time.monotonic()
        return None

    # -- shutdown -------------------------------------------------------------------------
    def _shutdown_steps(self) -> list[Step]:
        """Leave in two steps, serve everything that arrives, drain, then close admission.

        Why this order (measured with the 1.6.1 frontend, default flags;
        docs/architecture.md#shutdown-sequence):
        the frontend stops routing to an instance when its Model record goes, without touching
        its requests; when the Endpoint record goes, it fails every request of that instance
        whose response stream is still connecting (HTTP 503). Withdrawing the Model record first
        and the Endpoint record only once requests stopped arriving leaves nothing to fail.
        ``run`` then cleans up the engine and closes the transports.
        """
        return [
            ("the idle canary", self.health.stop_idle_canary),
            ("discovery withdrawal", self._withdraw_models),
            ("the grace period", self._grace_period),
            ("discovery withdrawal", self._withdraw_all),
            ("engine.drain()", self._drain_engine),
            ("in-flight streams", self._wait_for_streams),
            ("cancelled streams", self._cancel_streams),
        ]

    async def _sleep_unless_forced(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.lifecycle.forced:
            left = end - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.05))

    async def _withdraw_models(self) -> None:
        await self._withdraw(models_only=True)
        log.info(
            "Model withdrawn from discovery; serving requests that raced it for %.2fs",
            self.config.graceful_shutdown_grace_period,
        )

    async def _grace_period(self) -> None:
        await self._sleep_unless_forced(
            max(self.config.graceful_shutdown_grace_period, WITHDRAW_GAP_S)
        )
        await self._wait_quiet()

    async def _withdraw_all(self) -> None:
        await self._withdraw(models_only=False)
        log.info("Endpoint unregistered from discovery")

    async def _drain_engine(self) -> None:
        self._drain_started = time.monotonic()
        try:
            await asyncio.wait_for(
                self.engine.drain(), max(self.config.graceful_shutdown_timeout, 0.1)
            )
        except Exception:  # noqa: BLE001
            log.warning("engine.drain() failed; continuing shutdown", exc_info=True)

    async def _wait_for_streams(self) -> None:
        """Up to ``graceful_shutdown_timeout`` for in-flight streams to end by themselves."""
        adapter, timeout = self.adapter, self.config.graceful_shutdown_timeout
        if adapter is None or not adapter.active:
            return
        log.info("waiting for %d in-flight stream(s), up to %.1fs", len(adapter.active), timeout)
        deadline = time.monotonic() + timeout
        while adapter.active and not self.lifecycle.forced:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await adapter.wait_idle(min(left, 0.1))

    async def _cancel_streams(self) -> None:
        """Cancel what still runs; cancelled streams end with a clean terminal."""
        adapter = self.adapter
        if adapter is None or not adapter.active:
            return
        log.warning("cancelling %d stream(s) still running at the deadline", len(adapter.active))
        # Give them a moment to flush. Cancel again on every turn so that a request admitted
        # meanwhile ends the same way.
        flush_end = time.monotonic() + CANCEL_FLUSH_S
        while adapter.active and time.monotonic() < flush_end:
            adapter.cancel_all()
            await adapter.wait_idle(0.1)

    async def _withdraw(self, *, models_only: bool) -> None:
        """Delete this instance's Model records, or (``models_only=False``) every key."""
        discovery = self._services.discovery
        assert discovery is not None
        try:
            if models_only:
                for key in [k for k in discovery.records if k.startswith(MDC_BUCKET + "/")]:
                    await asyncio.wait_for(discovery.delete(key), 5.0)
            else:
                await asyncio.wait_for(discovery.unregister_all(), 5.0)
        except Exception:  # noqa: BLE001 - the lease / heartbeat expiry removes them anyway
            log.warning("discovery withdrawal failed", exc_info=True)

    async def _wait_quiet(self) -> None:
        """Wait until no request was admitted for ``QUIET_S`` (at most ``QUIET_MAX_WAIT_S``)."""
        end = time.monotonic() + QUIET_MAX_WAIT_S
        while not self.lifecycle.forced and time.monotonic() < end:
            since = time.monotonic() - self._last_admit
            if since >= QUIET_S:
                return
            await asyncio.sleep(QUIET_S - since)

    async def _cleanup_once(self) -> None:
        """Close admission and run ``engine.cleanup()`` if ``start()`` was called; once."""
        if not self.lifecycle.cleanup_owed:
            self.lifecycle.stopped()
            return
        # The engine is about to be cleaned up: from here on nothing could be served.
        self.lifecycle.begin_stopping()
        if self.metrics is not None and self._drain_started is not None:
            self.metrics.set_drain_time(time.monotonic() - self._drain_started)
        started = time.monotonic()
        try:
            await self.engine.cleanup()
            log.info("Engine cleanup complete")
        except Exception:  # noqa: BLE001
            log.error("engine cleanup failed", exc_info=True)
        if self.metrics is not None:
            self.metrics.set_cleanup_time(time.monotonic() - started)
        self.lifecycle.stopped()

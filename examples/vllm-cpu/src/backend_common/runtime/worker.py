"""The worker lifecycle: startup, serve, graceful shutdown.

The lifecycle and the measured reasons for the shutdown order:
docs/architecture.md#lifecycle and docs/architecture.md#shutdown-sequence.

``Worker(engine, config).run()`` is the whole life of a backend process, in
the order Dynamo's workers follow:

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
import enum
import logging
import os
import signal
import sys
import threading
import time
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
from ..kv_events import EventPlane
from ..transport.plane import RequestPlane, request_plane_for
from ..types import FinishReason, PreprocessedRequest
from .adapter import EngineAdapter
from .canary import IdleCanary
from .engine_metrics import scrape_registry
from .health import resolve_health_check_payload
from .kv_routing import setup_kv_routing
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


class State(enum.Enum):
    INIT = "init"
    RUNNING = "running"
    START_FAILED = "start_failed"
    STOPPED = "stopped"


class Worker:
    def __init__(self, engine: LLMEngine, config: WorkerConfig) -> None:
        self.engine = engine
        self.config = config
        self.state = State.INIT
        self.cleanup_calls = 0
        self.instance_id = 0
        self.engine_config: EngineConfig | None = None
        self.metrics: WorkerMetrics | None = None
        self.adapter: EngineAdapter | None = None
        self._shutdown = asyncio.Event()
        self._signals = 0
        # True from "Serving" on (health, tests); admission does not depend on it.
        self._accepting = False
        # Set just before engine.cleanup(): the only time the worker refuses a request. Admission
        # is open from the moment the request plane listens, before the records go out, because
        # the frontend routes here as soon as it sees them and does not retry a refusal.
        self._admission_closed = False
        # Set when shutdown starts: health says "notready"; a lost lease is not re-registered.
        self._draining = False
        self._last_admit = 0.0
        self._discovery: Discovery | None = None
        self._plane: RequestPlane | None = None
        self._status: StatusServer | None = None
        self._card: dict[str, Any] | None = None
        self._health_payload: dict[str, Any] | None = None
        self._events: EventPlane | None = None
        # What shutdown is waiting for right now (logged if the deadline passes).
        self._stage = "startup"
        self._deadline_timer: threading.Timer | None = None
        self._idle_canary: IdleCanary | None = None

    # -- public --------------------------------------------------------------------
    def request_shutdown(self) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("shutdown requested; running graceful shutdown")
            self._arm_deadline()
        else:
            log.warning("second shutdown signal: skipping the remaining waits")
        self._shutdown.set()

    async def run(self) -> int:
        """Run until shut down; return the process exit code."""
        loop = asyncio.get_running_loop()
        self._install_signal_handlers(loop)
        guarded = _guard_loop_signal_handlers(loop)
        try:
            return await self._run()
        finally:
            if self._idle_canary is not None:
                await self._idle_canary.close()
            await self._cleanup_once()
            self._stage = "closing transports"
            await self._close_transports()
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
        message = (
            f"Graceful shutdown exceeded {deadline:.1f}s while waiting for {self._stage}; "
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
        cfg = self.config
        try:
            self._discovery = create_discovery(cfg)
            await self._discovery.connect()
        except Exception as exc:  # noqa: BLE001
            return self._fatal("discovery", exc)
        self.instance_id = self._discovery.instance_id
        if self._shutdown.is_set():
            log.info("Shutdown signal observed before engine.start(); exiting cleanly")
            return 0

        started = time.monotonic()
        self._stage = "engine.start()"
        try:
            self.engine_config = await self.engine.start(self.instance_id)
            self.state = State.RUNNING
        except Exception as exc:  # noqa: BLE001
            self.state = State.START_FAILED
            return self._fatal("engine.start", exc)
        load_time = time.monotonic() - started
        # An engine may have replaced the worker's handlers with signal.signal: take them back.
        self._install_signal_handlers(asyncio.get_running_loop())
        if self._shutdown.is_set():
            # Never register a worker that is already leaving; cleanup runs once in run().
            log.info("Shutdown signal observed during engine.start(); not registering")
            return 0
        self._stage = "startup"
        if not self.engine_config.model:
            return self._fatal("engine.start", ValueError("EngineConfig.model is empty"))
        log.info("engine started in %.2fs", load_time)

        try:
            await self._setup_observability(load_time)
            self.adapter = self._build_adapter()
            await self._start_request_plane()
            await self._register()
        except Exception as exc:  # noqa: BLE001
            return self._fatal("startup", exc)

        self._accepting = True
        log.info(
            "Serving %s on %s.%s.%s (instance %x)",
            self._public_name(),
            cfg.namespace,
            cfg.component,
            cfg.endpoint,
            self.instance_id,
        )
        if cfg.health_check_enabled and self._health_payload is not None:
            self._idle_canary = IdleCanary(
                self._run_canary,
                lambda: self._last_admit,
                wait_s=cfg.canary_wait_time,
                timeout_s=cfg.health_check_request_timeout,
            )
            self._idle_canary.start()
        self._stage = "a shutdown signal"
        await self._shutdown.wait()
        await self._graceful_shutdown()
        return 0

    def _public_name(self) -> str:
        ec = self.engine_config
        return (
            self.config.served_model_name
            or (ec.served_model_name if ec else None)
            or self.config.model_name
            or (ec.model if ec else "")
        )

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
            model_name=self._public_name(),
            worker_id=self.instance_id,
            extra_labels=cfg.metrics_labels,
        )
        self.metrics.set_model_load_time(load_time)
        await self.engine.setup_metrics(self.metrics.registry)
        if cfg.enable_kv_routing:
            self._events = await setup_kv_routing(
                self.engine, cfg, ec, self.instance_id, self.metrics.registry, self.metrics.labels
            )
        self._health_payload = await resolve_health_check_payload(
            cfg.health_check_payload, self.engine
        )

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
        self._plane = request_plane_for(
            cfg, admit=self._admission_refusal, handle=self.adapter.handle
        )
        await self._plane.start(self.instance_id)
        if cfg.system_port is not None:
            self._status = StatusServer(
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
                health=self._health,
            )
            await self._status.start()

    # -- registration ------------------------------------------------------------------
    def _records(self, instance_id: int) -> list[tuple[str, dict[str, Any]]]:
        cfg = self.config
        ns, comp, ep = cfg.namespace, cfg.component, cfg.endpoint
        assert self._plane is not None and self._card is not None
        events = self._events.records(instance_id) if self._events is not None else []
        return [
            *events,
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
                    self._plane.transport(instance_id),
                    device_type=None,
                    # The frontend encodes request bodies (and we encode response items) with
                    # the codec the Endpoint record advertises: JSON by default.
                    codec=cfg.request_plane_codec,
                ),
            ),
        ]

    async def _register(self) -> None:
        assert self._discovery is not None and self.engine_config is not None
        base_url = self._status.base_url if self._status is not None else None
        card = build_model_card(self.config, self.engine_config, base_url=base_url)
        self._card = card.card
        if self._status is not None:
            self._status.set_files(card.files_prefix, card.files)
        self._discovery.on_reregistered = self._reregister
        for key, value in self._records(self.instance_id):
            await self._discovery.put(key, value)

    async def _reregister(self, new_id: int) -> None:
        if self._draining:
            # Leaving anyway: re-registering would make the frontend route here again.
            log.warning("discovery lease was lost during shutdown; not re-registering")
            return
        log.warning("discovery lease was lost; re-registering as instance %x", new_id)
        self.instance_id = new_id
        assert self._discovery is not None and self._plane is not None
        await self._plane.serve_instance(new_id)
        for key, value in self._records(new_id):
            await self._discovery.put(key, value)

    # -- admission --------------------------------------------------------------------
    # Open from the request plane's start until just before engine.cleanup(), shutdown included:
    # a refusal ("Server unavailable") is not retried by the 1.6.1 frontend with its default
    # flags, so it would be a client-visible error. Shutdown stops the routing via discovery.
    # (The TCP plane refuses frames for another endpoint itself.)
    def _admission_refusal(self) -> str | None:
        """Why a request for this endpoint is refused now, or None to accept it.

        Called by the request plane once per request, before its ACK; never blocks.
        """
        if self._admission_closed:
            return "Server unavailable: worker is shutting down"
        self._last_admit = time.monotonic()
        return None

    # -- health -------------------------------------------------------------------------
    async def _health(self) -> tuple[bool, dict[str, Any]]:
        if self.state is not State.RUNNING or self._draining or not self._accepting:
            return False, {"status": "notready", "state": self.state.value}
        if self._health_payload is None:
            return True, {"status": "healthy", "canary": "disabled"}
        if self._idle_canary is not None:
            # The canary runs by itself on an idle worker; report its latest result.
            last = self._idle_canary.last
            if last is None:
                return True, {"status": "healthy", "canary": "not run yet"}
            age = time.monotonic() - last.at
            body = {"canary": last.detail, "canary_age_s": round(age, 3)}
            return last.ok, {"status": "healthy" if last.ok else "unhealthy", **body}
        ok, detail = await self._run_canary(self.config.health_check_request_timeout)
        return ok, {"status": "healthy" if ok else "unhealthy", "canary": detail}

    async def _run_canary(self, timeout: float) -> tuple[bool, str]:  # noqa: ASYNC109
        from ..context import GenerateContext

        try:
            request = PreprocessedRequest.from_dict(dict(self._health_payload or {}))
        except Exception as exc:  # noqa: BLE001
            return False, f"invalid canary payload: {exc}"
        ctx = GenerateContext()

        async def one() -> tuple[bool, str]:
            stream = self.engine.generate(request, ctx)
            try:
                async for item in stream:
                    if item.finish_reason is FinishReason.ERROR:
                        return False, f"error terminal: {item.error_message}"
                    if item.finish_reason is not None:
                        return True, "ok"
                return False, "stream ended without a terminal"
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()

        try:
            return await asyncio.wait_for(one(), timeout)
        except TimeoutError:
            ctx.stop_generating()
            return False, f"timed out after {timeout:g}s"
        except Exception as exc:  # noqa: BLE001
            return False, str(from_exception(exc))

    # -- shutdown -------------------------------------------------------------------------
    def _shutdown_forced(self) -> bool:
        return self._signals > 1

    async def _sleep_unless_forced(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._shutdown_forced():
            left = end - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.05))

    async def _graceful_shutdown(self) -> None:
        """Leave in two steps, serve everything that arrives, drain, then close admission.

        Why this order (measured with the 1.6.1 frontend, default flags;
        docs/architecture.md#shutdown-sequence):
        the frontend stops routing to an instance when its Model record goes, without touching
        its requests; when the Endpoint record goes, it fails every request of that instance
        whose response stream is still connecting (HTTP 503). Withdrawing the Model record first
        and the Endpoint record only once requests stopped arriving leaves nothing to fail.
        """
        timeout = self.config.graceful_shutdown_timeout
        grace = self.config.graceful_shutdown_grace_period
        assert self._discovery is not None
        self._draining = True
        if self._idle_canary is not None:
            await self._idle_canary.close()
        self._stage = "discovery withdrawal"
        await self._withdraw(self._discovery, models_only=True)
        log.info("Model withdrawn from discovery; serving requests that raced it for %.2fs", grace)
        self._stage = "the grace period"
        await self._sleep_unless_forced(max(grace, WITHDRAW_GAP_S))
        await self._wait_quiet()
        self._stage = "discovery withdrawal"
        await self._withdraw(self._discovery, models_only=False)
        log.info("Endpoint unregistered from discovery")

        drain_started = time.monotonic()
        self._stage = "engine.drain()"
        try:
            await asyncio.wait_for(self.engine.drain(), max(timeout, 0.1))
        except Exception:  # noqa: BLE001
            log.warning("engine.drain() failed; continuing shutdown", exc_info=True)
        adapter = self.adapter
        if adapter is not None and adapter.active:
            log.info(
                "waiting for %d in-flight stream(s), up to %.1fs", len(adapter.active), timeout
            )
            deadline = time.monotonic() + timeout
            while adapter.active and not self._shutdown_forced():
                self._stage = f"{len(adapter.active)} in-flight stream(s)"
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                await adapter.wait_idle(min(left, 0.1))
        if adapter is not None and adapter.active:
            n = len(adapter.active)
            log.warning("cancelling %d stream(s) still running at the deadline", n)
            # Cancelled streams end with a clean terminal; give them a moment to flush. Cancel
            # again on every turn so that a request admitted meanwhile ends the same way.
            flush_end = time.monotonic() + CANCEL_FLUSH_S
            while adapter.active and time.monotonic() < flush_end:
                adapter.cancel_all()
                await adapter.wait_idle(0.1)
        # The engine is about to be cleaned up: from here on nothing could be served.
        self._admission_closed = True
        if self.metrics is not None:
            self.metrics.set_drain_time(time.monotonic() - drain_started)

    async def _withdraw(self, discovery: Discovery, *, models_only: bool) -> None:
        """Delete this instance's Model records, or (``models_only=False``) every key."""
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
        while not self._shutdown_forced() and time.monotonic() < end:
            since = time.monotonic() - self._last_admit
            if since >= QUIET_S:
                return
            await asyncio.sleep(QUIET_S - since)

    async def _cleanup_once(self) -> None:
        if self.state not in (State.RUNNING, State.START_FAILED):
            self.state = State.STOPPED
            return
        self.state = State.STOPPED
        self.cleanup_calls += 1
        self._stage = "engine.cleanup()"
        started = time.monotonic()
        try:
            await self.engine.cleanup()
            log.info("Engine cleanup complete")
        except Exception:  # noqa: BLE001
            log.error("engine cleanup failed", exc_info=True)
        if self.metrics is not None:
            self.metrics.set_cleanup_time(time.monotonic() - started)

    async def _close_transports(self) -> None:
        for closer in (
            self._plane.close if self._plane else None,
            self._status.close if self._status else None,
            self._events.close if self._events else None,
            self._discovery.close if self._discovery else None,
        ):
            if closer is None:
                continue
            try:
                await asyncio.wait_for(closer(), 5.0)
            except Exception:  # noqa: BLE001
                log.debug("closing a transport failed", exc_info=True)

"""The worker lifecycle: startup, serve, graceful shutdown (contract section 7).

``Worker(engine, config).run()`` is the whole life of a backend process, in
the order Dynamo's workers follow:

startup
    signal handlers -> connect discovery -> ``engine.start(worker_id)`` ->
    ``setup_metrics`` -> ``kv_event_sources`` -> request plane and status
    server up -> model card and endpoint registered -> "Serving ...".
serve
    the request plane hands each accepted request to the ``EngineAdapter``.
shutdown (SIGTERM/SIGINT, first signal)
    1. leave discovery at once (the frontend stops routing here);
    2. grace period (``DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS``, default 5):
       requests that raced the withdrawal are still served;
    3. stop admission: new requests get the retryable ``Server unavailable``
       ACK, so the frontend picks another instance;
    4. ``engine.drain()``;
    5. wait for in-flight streams up to ``DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT``
       (default 30 s); streams still running then are cancelled and end with a
       clean ``cancelled`` terminal, never a cut socket;
    6. ``engine.cleanup()`` exactly once; transports closed; exit 0.

``cleanup()`` runs exactly once if ``start()`` was called, also when it raised
or when registration failed; never when the process stopped before ``start``.
A second signal during shutdown skips the remaining waits.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
import sys
import time
from typing import Any

from .adapter import EngineAdapter
from .config import EngineConfig, WorkerConfig
from .discovery import create_discovery
from .discovery.base import (
    Discovery,
    endpoint_record,
    instance_key,
    model_key,
    model_record,
    nats_transport,
    tcp_transport,
)
from .engine import LLMEngine
from .errors import from_exception
from .health import resolve_health_check_payload
from .kv_events import EventPlane, setup_kv_routing
from .metrics import WorkerMetrics
from .modelcard import build_model_card
from .status import StatusServer
from .transport.tcp import TcpRequestServer
from .types import FinishReason, PreprocessedRequest

__all__ = ["Worker"]

log = logging.getLogger(__name__)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        log.warning("%s=%r is not a number; using %s", name, raw, default)
        return default
    if value != value or value < 0:  # NaN or negative
        return 0.0 if value < 0 else default
    return value


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
        self._accepting = False
        self._discovery: Discovery | None = None
        self._tcp: TcpRequestServer | None = None
        self._nats: Any = None
        self._nats_server: Any = None
        self._status: StatusServer | None = None
        self._card: dict[str, Any] | None = None
        self._health_payload: dict[str, Any] | None = None
        self._events: EventPlane | None = None
        self._endpoint_suffix = f"/{config.namespace}/{config.component}/{config.endpoint}"

    # -- public --------------------------------------------------------------------
    def request_shutdown(self) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("shutdown requested; running graceful shutdown")
        else:
            log.warning("second shutdown signal: skipping the remaining waits")
        self._shutdown.set()

    async def run(self) -> int:
        """Run until shut down; return the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_shutdown)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass
        try:
            return await self._run()
        finally:
            await self._cleanup_once()
            await self._close_transports()
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.remove_signal_handler(sig)
                except (NotImplementedError, RuntimeError):
                    pass

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
        try:
            self.engine_config = await self.engine.start(self.instance_id)
            self.state = State.RUNNING
        except Exception as exc:  # noqa: BLE001
            self.state = State.START_FAILED
            return self._fatal("engine.start", exc)
        load_time = time.monotonic() - started
        if not self.engine_config.model:
            return self._fatal("engine.start", ValueError("EngineConfig.model is empty"))
        log.info("engine started in %.2fs", load_time)

        try:
            await self._setup_observability(load_time)
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
        cfg, ec = self.config, self.engine_config
        assert ec is not None
        self.metrics = WorkerMetrics(
            namespace=cfg.namespace,
            component=cfg.component,
            endpoint=cfg.endpoint,
            model=ec.model,
            model_name=self._public_name(),
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
        self.adapter = EngineAdapter(
            self.engine, mode=cfg.disaggregation_mode, metrics=self.metrics, engine_config=ec
        )

    async def _start_request_plane(self) -> None:
        cfg = self.config
        assert self.adapter is not None
        if cfg.request_plane == "nats":
            import nats

            from .nats_options import nats_connect_options
            from .transport.nats import NatsRequestServer, nats_subject

            self._nats = await nats.connect(**nats_connect_options(cfg.nats_server))
            subject = nats_subject(cfg.namespace, cfg.component, cfg.endpoint, self.instance_id)
            self._nats_server = NatsRequestServer(
                self._nats, subject, admit=self._admit_nats, handle=self.adapter.handle
            )
            await self._nats_server.start()
        else:
            self._tcp = TcpRequestServer(
                cfg.tcp_host, cfg.tcp_port, admit=self._admit, handle=self.adapter.handle
            )
            await self._tcp.start()
        if cfg.system_port is not None:
            self._status = StatusServer(
                cfg.system_host,
                cfg.system_port,
                registry=self.metrics.registry if self.metrics else None,
                health=self._health,
            )
            await self._status.start()

    # -- registration ------------------------------------------------------------------
    def _records(self, instance_id: int) -> list[tuple[str, dict[str, Any]]]:
        cfg = self.config
        ns, comp, ep = cfg.namespace, cfg.component, cfg.endpoint
        if cfg.request_plane == "nats":
            from .transport.nats import nats_subject

            transport = nats_transport(nats_subject(ns, comp, ep, instance_id))
        else:
            assert self._tcp is not None
            transport = tcp_transport(self._tcp.host, self._tcp.port, instance_id, ns, comp, ep)
        assert self._card is not None
        events = self._events.records(instance_id) if self._events is not None else []
        return [
            *events,
            (
                model_key(ns, comp, ep, instance_id),
                model_record(ns, comp, ep, instance_id, self._card),
            ),
            (
                instance_key(ns, comp, ep, instance_id),
                endpoint_record(ns, comp, ep, instance_id, transport, device_type=None),
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
        log.warning("discovery lease was lost; re-registering as instance %x", new_id)
        self.instance_id = new_id
        assert self._discovery is not None
        if self._nats_server is not None:
            # The NATS subject embeds the instance id: listen on the new one too.
            from .transport.nats import nats_subject

            cfg = self.config
            await self._nats_server.add_subject(
                nats_subject(cfg.namespace, cfg.component, cfg.endpoint, new_id)
            )
        for key, value in self._records(new_id):
            await self._discovery.put(key, value)

    # -- admission --------------------------------------------------------------------
    def _admit(self, path: str) -> str | None:
        ph = getattr(self, "_exp_phase", "run")
        log.warning("EXP admit phase=%s t=%.3f", ph, time.monotonic() - getattr(self, "_exp_t0", 0))
        if not path.endswith(self._endpoint_suffix):
            return f"Server unavailable: unknown endpoint {path}"
        if not self._accepting:
            return "Server unavailable: worker is shutting down"
        return None

    def _admit_nats(self, subject: str) -> str | None:
        if not self._accepting:
            return "Server unavailable: worker is shutting down"
        return None

    # -- health -------------------------------------------------------------------------
    async def _health(self) -> tuple[bool, dict[str, Any]]:
        if self.state is not State.RUNNING or not self._accepting:
            return False, {"status": "notready", "state": self.state.value}
        if self._health_payload is None:
            return True, {"status": "healthy", "canary": "disabled"}
        ok, detail = await self._run_canary()
        return ok, {"status": "healthy" if ok else "unhealthy", "canary": detail}

    async def _run_canary(self) -> tuple[bool, str]:
        from .context import GenerateContext

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
                await stream.aclose()

        try:
            return await asyncio.wait_for(one(), 10.0)
        except TimeoutError:
            ctx.stop_generating()
            return False, "timed out after 10s"
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
        timeout = _env_float("DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT", 30.0)
        grace = _env_float("DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS", 5.0)
        assert self._discovery is not None
        order = os.environ.get("DYN_EXP_ORDER", "all")
        gap = _env_float("DYN_EXP_GAP", 1.0)
        refuse = os.environ.get("DYN_EXP_REFUSE", "1") == "1"
        self._exp_t0 = time.monotonic()
        log.warning("EXP sigterm at %.3f inflight=%d", self._exp_t0, len(self.adapter.active) if self.adapter else -1)
        self._exp_phase = "sigterm"
        recs = list(self._discovery.records)
        mdc = [k for k in recs if k.startswith("v1/mdc/")]
        inst = [k for k in recs if k.startswith("v1/instances/")]
        try:
            if order == "all":
                await asyncio.wait_for(self._discovery.unregister_all(), 5.0)
            else:
                first, second = (mdc, inst) if order == "mdc_first" else (inst, mdc)
                for k in first:
                    await self._discovery.delete(k)
                self._exp_phase = "first_deleted"
                log.warning("EXP first deleted %s", first)
                await self._sleep_unless_forced(gap)
                await asyncio.wait_for(self._discovery.unregister_all(), 5.0)
            self._exp_phase = "all_deleted"
            log.warning("EXP all deleted")
        except Exception:  # noqa: BLE001
            log.warning("discovery unregister failed", exc_info=True)
        if grace > 0:
            await self._sleep_unless_forced(grace)
        if refuse:
            self._accepting = False
        self._exp_phase = "drain"

        drain_started = time.monotonic()
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
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                await adapter.wait_idle(min(left, 0.1))
            if adapter.active:
                n = adapter.cancel_all()
                log.warning("cancelling %d stream(s) still running at the deadline", n)
                # Cancelled streams end with a clean terminal; give them a moment to flush.
                await adapter.wait_idle(5.0)
        if self.metrics is not None:
            self.metrics.set_drain_time(time.monotonic() - drain_started)

    async def _cleanup_once(self) -> None:
        if self.state not in (State.RUNNING, State.START_FAILED):
            self.state = State.STOPPED
            return
        self.state = State.STOPPED
        self.cleanup_calls += 1
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
            self._tcp.close if self._tcp else None,
            self._nats_server.close if self._nats_server else None,
            self._nats.close if self._nats else None,
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

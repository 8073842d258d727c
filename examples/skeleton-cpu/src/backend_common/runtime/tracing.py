"""The ``engine.generate`` span around every request, on OpenTelemetry (optional dependency).

Off unless ``OTEL_EXPORT_ENABLED`` is truthy (``1``/``true``/``yes``/``on``) and
``opentelemetry-api`` is installed; then ``GenerateTracer.from_env(mode, model)``
returns a tracer, else None, and the request adapter does not touch tracing at all
(no per-item cost when off).

When on, the adapter calls ``tracer.wrap(stream, request, ctx)`` once per request. The
wrapper opens the span ``engine.generate`` (a child of the W3C ``traceparent`` /
``tracestate`` the request arrived with, else a new trace), makes it the *current* span
while the engine's generator runs, and records:

* at entry: ``model``, ``input_tokens``, ``disagg_role`` (``agg|prefill|decode|encode``);
* at the first item with tokens: ``ttft_ms`` (since the span started);
* at the terminal: ``output_tokens`` (sum of token ids), ``finish_reason``, ``cancelled``
  and, with two or more token items, ``avg_itl_ms``, ``itl_p50_ms``, ``itl_p99_ms``,
  ``itl_max_ms`` (nearest rank over the gaps between token items);
* on an exception: ``error_kind`` (the ``ErrorType`` name), the exception, status ERROR.

Engine code adds to it with ``current_span()`` (attributes, events) or opens child spans
with ``start_span(name, **attrs)``; both are no-ops while tracing is off.

Export: the first tracer built installs an SDK ``TracerProvider`` exporting over OTLP
(``opentelemetry-exporter-otlp``, standard ``OTEL_EXPORTER_OTLP_*`` variables) unless the
application set a provider itself; ``set_tracer_provider(provider)`` overrides it (tests
use an in-memory exporter).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from ..config import DisaggregationMode
from ..context import GenerateContext
from ..types import LLMEngineOutput, PreprocessedRequest

__all__ = [
    "SPAN_NAME",
    "GenerateTracer",
    "current_span",
    "enabled",
    "set_tracer_provider",
    "start_span",
]

log = logging.getLogger(__name__)

SPAN_NAME = "engine.generate"
ENV = "OTEL_EXPORT_ENABLED"
INSTRUMENTATION = "backend_common"

_provider: Any = None
_configured = False


def enabled() -> bool:
    """``OTEL_EXPORT_ENABLED`` is truthy and the OpenTelemetry API is importable."""
    if os.environ.get(ENV, "").strip().lower() not in ("1", "true", "yes", "on"):
        return False
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        log.warning("%s is set but opentelemetry-api is not installed; tracing is off", ENV)
        return False
    return True


def set_tracer_provider(provider: Any) -> None:
    """Use ``provider`` for the spans of tracers built from now on (instead of the global one)."""
    global _provider, _configured
    _provider = provider
    _configured = True


def _configure_export() -> None:
    # Install an OTLP-exporting SDK provider once, unless the application has its own.
    global _configured
    if _configured:
        return
    _configured = True
    from opentelemetry import trace

    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "tracing is on but opentelemetry-sdk / opentelemetry-exporter-otlp are not "
            "installed: spans are created but not exported"
        )
        return
    service = os.environ.get("OTEL_SERVICE_NAME", INSTRUMENTATION)
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def _tracer() -> Any:
    from opentelemetry import trace

    if _provider is not None:
        return _provider.get_tracer(INSTRUMENTATION)
    return trace.get_tracer(INSTRUMENTATION)


class _NoopSpan:
    """Stands in for a span while tracing is off: every call does nothing."""

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def add_event(self, name: str, attributes: dict[str, Any] | None = None) -> None:
        pass

    def is_recording(self) -> bool:
        return False

    def __enter__(self) -> _NoopSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


_NOOP = _NoopSpan()


def current_span() -> Any:
    """The current span (``engine.generate`` inside ``generate``); a no-op when tracing is off."""
    try:
        from opentelemetry import trace
    except ImportError:
        return _NOOP
    span = trace.get_current_span()
    return span if span.is_recording() else _NOOP


def start_span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """``with start_span("kv_load", blocks=8) as span:`` a child of the current span."""
    span = current_span()
    if span is _NOOP:
        return nullcontext(_NOOP)
    return _tracer().start_as_current_span(name, attributes=attributes or None)


def _nearest_rank(sorted_values: list[float], q: float) -> float:
    rank = max(1, -(-len(sorted_values) * q // 1))  # ceil(n * q), at least 1
    return sorted_values[int(rank) - 1]


class GenerateTracer:
    """Builds the ``engine.generate`` span of each request (see the module docstring)."""

    def __init__(self, mode: DisaggregationMode, model: str) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        _configure_export()
        self.role = mode.value
        self.model = model
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_env(cls, mode: DisaggregationMode, model: str) -> GenerateTracer | None:
        return cls(mode, model) if enabled() else None

    async def wrap(
        self,
        stream: AsyncIterator[LLMEngineOutput],
        request: PreprocessedRequest,
        ctx: GenerateContext,
    ) -> AsyncIterator[LLMEngineOutput]:
        from opentelemetry import context as otel_context
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        parent = self._propagator.extract(ctx.trace_headers) if ctx.trace_headers else None
        span = _tracer().start_span(
            SPAN_NAME,
            context=parent,
            attributes={
                "model": self.model,
                "input_tokens": len(request.token_ids),
                "disagg_role": self.role,
                "request_id": ctx.id(),
            },
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        started = time.monotonic()
        last: float | None = None
        gaps: list[float] = []
        output_tokens = 0
        try:
            async for item in stream:
                if item.token_ids:
                    now = time.monotonic()
                    if last is None:
                        span.set_attribute("ttft_ms", (now - started) * 1000.0)
                    else:
                        gaps.append((now - last) * 1000.0)
                    last = now
                    output_tokens += len(item.token_ids)
                if item.finish_reason is not None:
                    span.set_attribute("output_tokens", output_tokens)
                    span.set_attribute("finish_reason", str(item.finish_reason.value))
                    span.set_attribute("cancelled", ctx.is_stopped())
                    if gaps:
                        ordered = sorted(gaps)
                        span.set_attribute("avg_itl_ms", sum(gaps) / len(gaps))
                        span.set_attribute("itl_p50_ms", _nearest_rank(ordered, 0.50))
                        span.set_attribute("itl_p99_ms", _nearest_rank(ordered, 0.99))
                        span.set_attribute("itl_max_ms", ordered[-1])
                yield item
        except BaseException as exc:
            from ..errors import from_exception

            if isinstance(exc, Exception):
                err = from_exception(exc)
                span.set_attribute("error_kind", err.kind)
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, err.message))
            raise
        finally:
            try:
                # Close the engine's generator here, inside the span, so its cleanup runs now
                # (the adapter closes only the outermost stream).
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                otel_context.detach(token)
                span.end()

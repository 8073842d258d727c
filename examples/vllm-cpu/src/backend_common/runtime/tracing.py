"""The ``engine.generate`` span around every request, on OpenTelemetry (optional dependency).

Off unless ``WorkerConfig.tracing`` (``OTEL_EXPORT_ENABLED``) is set and
``opentelemetry-api`` is installed; then ``GenerateTracer.create(on, mode, model)``
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

Engine code adds to it with ``backend_common.spans.current_span()`` (attributes, events)
or opens child spans with ``start_span(name, **attrs)``; both are no-ops while tracing is
off.

Export: the first tracer built installs an SDK ``TracerProvider`` exporting over OTLP
(``spans.configure_export``: OTLP/HTTP by default, ``WorkerConfig.otel_exporter_protocol``;
standard ``OTEL_EXPORTER_OTLP_*`` variables) unless the
application set a provider itself; ``set_tracer_provider(provider)`` overrides it (tests
use an in-memory exporter).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from ..config import DisaggregationMode
from ..context import GenerateContext
from ..spans import (
    INSTRUMENTATION,
    configure_export,
    current_span,
    set_tracer_provider,
    start_span,
    tracer,
)
from ..streams import close_stream
from ..types import LLMEngineOutput, PreprocessedRequest

__all__ = [
    "SPAN_NAME",
    "GenerateTracer",
    "available",
    "current_span",
    "set_tracer_provider",
    "start_span",
]

log = logging.getLogger(__name__)

SPAN_NAME = "engine.generate"


def available() -> bool:
    """The OpenTelemetry API is importable (warns when it is not)."""
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        log.warning("tracing is on but opentelemetry-api is not installed; tracing is off")
        return False
    return True


def _nearest_rank(sorted_values: list[float], q: float) -> float:
    rank = max(1, -(-len(sorted_values) * q // 1))  # ceil(n * q), at least 1
    return sorted_values[int(rank) - 1]


class GenerateTracer:
    """Builds the ``engine.generate`` span of each request (see the module docstring)."""

    def __init__(
        self,
        mode: DisaggregationMode,
        model: str,
        service_name: str = INSTRUMENTATION,
        protocol: str = "http/protobuf",
    ) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        configure_export(service_name, protocol)
        self.role = mode.value
        self.model = model
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def create(
        cls,
        on: bool,
        mode: DisaggregationMode,
        model: str,
        service_name: str = INSTRUMENTATION,
        protocol: str = "http/protobuf",
    ) -> GenerateTracer | None:
        """A tracer when ``on`` and OpenTelemetry is installed, else None (tracing off)."""
        return cls(mode, model, service_name, protocol) if on and available() else None

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
        span = tracer().start_span(
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
                await close_stream(stream)
            finally:
                otel_context.detach(token)
                span.end()

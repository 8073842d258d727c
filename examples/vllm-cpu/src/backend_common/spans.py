"""Spans for engine code: add to the request's ``engine.generate`` span, or open child spans.

    from backend_common.spans import current_span, start_span

    current_span().set_attribute("engine.batch", 4)   # the request's span, inside generate
    with start_span("kv_load", blocks=8):              # a child span
        ...

Both are no-ops (no OpenTelemetry calls at all) while tracing is off
(``WorkerConfig.tracing``, ``OTEL_EXPORT_ENABLED``) or ``opentelemetry-api`` is missing.
The worker's side, the ``engine.generate`` span itself, is ``runtime.tracing``; it shares
the tracer provider kept here (``set_tracer_provider`` overrides it, e.g. for tests).
"""

from __future__ import annotations

import importlib
import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any

__all__ = [
    "INSTRUMENTATION",
    "configure_export",
    "current_span",
    "set_tracer_provider",
    "start_span",
    "tracer",
]

log = logging.getLogger(__name__)

INSTRUMENTATION = "backend_common"

_provider: Any = None
_configured = False


def set_tracer_provider(provider: Any) -> None:
    """Use ``provider`` for the spans of tracers built from now on (instead of the global one)."""
    global _provider, _configured
    _provider = provider
    _configured = True


def configure_export(service_name: str = INSTRUMENTATION, protocol: str = "http/protobuf") -> None:
    """Install an OTLP-exporting SDK provider once, unless the application has its own.

    ``protocol`` ``http/protobuf`` uses opentelemetry-exporter-otlp-proto-http (the
    ``tracing`` extra), ``grpc`` opentelemetry-exporter-otlp-proto-grpc; the exporter reads
    its endpoint and the rest from the standard ``OTEL_EXPORTER_OTLP_*`` variables. Without
    the package the spans are created but not exported (logged once).
    """
    global _configured
    if _configured:
        return
    _configured = True
    from opentelemetry import trace

    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return
    package = "grpc" if protocol == "grpc" else "http"
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        exporter = importlib.import_module(
            f"opentelemetry.exporter.otlp.proto.{package}.trace_exporter"
        )
    except ImportError:
        log.warning(
            "tracing is on but opentelemetry-sdk / opentelemetry-exporter-otlp-proto-%s are "
            "not installed: spans are created but not exported",
            package,
        )
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter.OTLPSpanExporter()))
    # TracerProvider flushes spans still queued at interpreter exit (shutdown_on_exit).
    trace.set_tracer_provider(provider)


def tracer() -> Any:
    """The tracer spans are created with (the configured provider's, else the global one)."""
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
    return tracer().start_as_current_span(name, attributes=attributes or None)

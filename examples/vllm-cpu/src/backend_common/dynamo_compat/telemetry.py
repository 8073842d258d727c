"""``dynamo.common.backend.telemetry``: add to the request's span, open child spans.

``current_span(context)`` is the request's ``engine.generate`` span; ``start_span(context,
name, **attrs)`` opens a child (use ``with``); ``trace_headers(context)`` and
``engine_trace_kwargs(context, kwarg_name=..., enabled=...)`` give the W3C headers to forward
to an inference engine (``{}`` when disabled or the request has none). Each delegates to the
context's method of the same name, as 1.6.1's facade does, so any object with 1.6.1's
``Context`` methods works.
"""

from __future__ import annotations

from typing import Any

__all__ = ["current_span", "engine_trace_kwargs", "start_span", "trace_headers"]


def current_span(context: Any) -> Any:
    return context.current_span()


def start_span(context: Any, name: str, **attrs: Any) -> Any:
    return context.start_span(name, dict(attrs) if attrs else None)


def trace_headers(context: Any) -> dict[str, str] | None:
    return context.trace_headers()


def engine_trace_kwargs(
    context: Any, *, kwarg_name: str = "trace_headers", enabled: bool = True
) -> dict[str, dict[str, str]]:
    if not enabled:
        return {}
    headers = context.trace_headers()
    return {} if headers is None else {kwarg_name: headers}

"""``dynamo._core`` for 1.6.1-style engines: ``Context``, ``SpanProxy``, ``ModelInput``.

``Context`` is what the compatibility adapter hands to a 1.6.1 engine's ``generate`` and
``abort``: a view of the request's ``backend_common.GenerateContext``, so stop and kill
from the frontend, and the worker's shutdown cancellation, reach the engine through the
calls it already makes (``is_stopped()``, ``is_killed()``, ``stop_generating()``,
``async_killed_or_stopped()``, ``id()``, ``metadata``, the trace ids and headers, and the
span methods that ``telemetry`` wraps). One ``Context`` per call; all of its methods are for
the event loop's thread, like ``GenerateContext``'s. Built with no arguments (tests) it owns
a fresh ``GenerateContext``.

``SpanProxy`` mirrors 1.6.1's span handle over ``backend_common.spans``: with tracing off
every call is a silent no-op, as in 1.6.1 without its OpenTelemetry bridge.
"""

from __future__ import annotations

import asyncio
import enum
from contextlib import AbstractContextManager
from typing import Any, Literal

from .. import spans
from ..context import GenerateContext

__all__ = ["HEALTH_CHECK_KEY", "Context", "ModelInput", "SpanProxy"]

HEALTH_CHECK_KEY = "_HEALTH_CHECK"


class ModelInput(enum.Enum):
    """What a model's requests carry. Only ``Tokens`` runs on this runtime (``WorkerConfig``)."""

    Tokens = "tokens"
    Text = "text"
    Tensor = "tensor"


class SpanProxy:
    """A span handle: ``set_attribute``, ``add_event``, ``set_status``, ``close``, ``with``.

    Wraps an OpenTelemetry span (or ``backend_common.spans``' no-op one). A child span opened
    by ``Context.start_span`` ends on ``close()`` or ``__exit__``, once; ``close`` on the
    request's own span does nothing (the worker ends it).
    """

    __slots__ = ("_span", "_cm", "_closed")

    def __init__(self, span: Any, cm: AbstractContextManager[Any] | None = None) -> None:
        self._span = span
        self._cm = cm
        self._closed = False

    def set_attribute(self, key: str, value: Any) -> None:
        self._span.set_attribute(key, value)

    def add_event(self, name: str, attrs: dict[str, Any] | None = None) -> None:
        self._span.add_event(name, attrs)

    def set_status(self, status: str, description: str | None = None) -> None:
        set_status = getattr(self._span, "set_status", None)
        if set_status is None:  # the no-op span
            return
        from opentelemetry.trace import Status, StatusCode

        code = StatusCode.ERROR if status.lower() == "error" else StatusCode.OK
        set_status(Status(code, description if code is StatusCode.ERROR else None))

    def close(self) -> None:
        if self._cm is not None and not self._closed:
            self._closed = True
            self._cm.__exit__(None, None, None)

    def __enter__(self) -> SpanProxy:
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> Literal[False]:
        if exc_type is not None and self._cm is not None and not self._closed:
            self._closed = True
            self._cm.__exit__(exc_type, exc_value, traceback)
        self.close()
        return False


def _traceparent_ids(headers: dict[str, str]) -> tuple[str | None, str | None]:
    parts = headers.get("traceparent", "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
        return parts[1], parts[2]
    return None, None


class Context:
    """The 1.6.1 request context over a ``GenerateContext`` (see the module docstring)."""

    __slots__ = ("_ctx",)

    def __init__(
        self,
        id: str | None = None,  # noqa: A002 - 1.6.1's keyword
        metadata: dict[str, str] | None = None,
        *,
        native: GenerateContext | None = None,
    ) -> None:
        self._ctx = native if native is not None else GenerateContext(id, metadata=metadata)

    @property
    def native(self) -> GenerateContext:
        """The ``GenerateContext`` this view reads and cancels."""
        return self._ctx

    def id(self) -> str:
        return self._ctx.id()

    def is_stopped(self) -> bool:
        return self._ctx.is_stopped()

    def is_killed(self) -> bool:
        return self._ctx.is_killed()

    def stop_generating(self) -> None:
        self._ctx.stop_generating()

    def async_killed_or_stopped(self) -> asyncio.Future[bool]:
        """A future that resolves to ``True`` once the request is stopped or killed."""
        return asyncio.ensure_future(self._wait_stopped())

    async def _wait_stopped(self) -> bool:
        await self._ctx.stopped()  # kill implies stop
        return True

    async def stopped(self) -> None:
        await self._ctx.stopped()

    async def killed(self) -> None:
        await self._ctx.killed()

    def notify_first_token(self) -> None:
        self._ctx.notify_first_token()

    def detached(self, id: str) -> Context:  # noqa: A002 - 1.6.1's keyword
        """A new context (own cancellation, id ``id``) with this one's metadata and trace."""
        return Context(
            native=GenerateContext(
                id, metadata=dict(self._ctx.metadata), trace_headers=self._ctx.trace_headers
            )
        )

    @property
    def metadata(self) -> dict[str, str]:
        return self._ctx.metadata

    @metadata.setter
    def metadata(self, metadata: dict[str, str]) -> None:
        self._ctx.metadata = dict(metadata)

    @property
    def trace_id(self) -> str | None:
        return _traceparent_ids(self._ctx.trace_headers)[0]

    @property
    def span_id(self) -> str | None:
        span = spans.current_span()
        get_context = getattr(span, "get_span_context", None)
        if get_context is not None:
            return f"{get_context().span_id:016x}"
        return _traceparent_ids(self._ctx.trace_headers)[1]

    @property
    def parent_span_id(self) -> str | None:
        return _traceparent_ids(self._ctx.trace_headers)[1]

    def trace_headers(self) -> dict[str, str] | None:
        """The request's W3C trace headers to forward to an inference engine, or ``None``."""
        headers = self._ctx.trace_headers
        return dict(headers) if "traceparent" in headers else None

    def current_span(self) -> SpanProxy:
        return SpanProxy(spans.current_span())

    def start_span(self, name: str, attrs: dict[str, Any] | None = None) -> SpanProxy:
        cm = spans.start_span(name, **(attrs or {}))
        return SpanProxy(cm.__enter__(), cm)

    def __repr__(self) -> str:
        return f"Context({self._ctx!r})"

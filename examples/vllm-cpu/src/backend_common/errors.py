"""Typed errors, as Dynamo classifies them.

Everything an engine or this runtime raises toward a client is a
``DynamoError`` whose ``error_type`` is ``ErrorType.Backend`` and whose
``backend_error`` says which category (``BackendError``). The category decides
what the frontend does with it: ``InvalidArgument`` becomes HTTP 400 and leaves
the worker in rotation; everything else becomes an error event in the stream.

Plain Python exceptions are mapped by ``from_exception`` in the same order as
Dynamo's Python bridge (docs/contract.md#errors): DynamoError as is, HTTP-like
exceptions by status, then by exception type, else ``Unknown``.
"""

from __future__ import annotations

import asyncio
import json
from enum import StrEnum

__all__ = [
    "BackendError",
    "DynamoError",
    "ErrorType",
    "cancelled",
    "cannot_connect",
    "connection_timeout",
    "disconnected",
    "engine_shutdown",
    "from_exception",
    "invalid_arg",
    "response_timeout",
    "stream_incomplete",
    "unknown",
]


class ErrorType(StrEnum):
    """Top-level categories. Engines use ``Backend``; the rest are for framework paths."""

    InvalidArgument = "InvalidArgument"
    CannotConnect = "CannotConnect"
    Disconnected = "Disconnected"
    ConnectionTimeout = "ConnectionTimeout"
    ResponseTimeout = "ResponseTimeout"
    Cancelled = "Cancelled"
    ResourceExhausted = "ResourceExhausted"
    WorkerOverloaded = "WorkerOverloaded"
    Unavailable = "Unavailable"
    WorkerUnavailable = "WorkerUnavailable"
    Backend = "Backend"
    Unknown = "Unknown"


class BackendError(StrEnum):
    """The nested category of ``ErrorType.Backend``."""

    Unknown = "Unknown"
    InvalidArgument = "InvalidArgument"
    CannotConnect = "CannotConnect"
    Disconnected = "Disconnected"
    ConnectionTimeout = "ConnectionTimeout"
    ResponseTimeout = "ResponseTimeout"
    Cancelled = "Cancelled"
    EngineShutdown = "EngineShutdown"
    StreamIncomplete = "StreamIncomplete"


class DynamoError(Exception):
    """An error with a category. Raise it inside ``generate`` to end the stream with it."""

    def __init__(
        self,
        message: str,
        backend_error: BackendError = BackendError.Unknown,
        *,
        error_type: ErrorType = ErrorType.Backend,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = ErrorType(error_type)
        self.backend_error = BackendError(backend_error)

    @property
    def kind(self) -> str:
        """The display name Dynamo uses: ``BackendInvalidArgument``, ``Unavailable``, ..."""
        if self.error_type is ErrorType.Backend:
            return f"Backend{self.backend_error.value}"
        return self.error_type.value

    @property
    def is_invalid_argument(self) -> bool:
        return self.error_type is ErrorType.InvalidArgument or (
            self.error_type is ErrorType.Backend
            and self.backend_error is BackendError.InvalidArgument
        )

    def wire_error_type(self) -> str:
        """The ``typed_error.error_type`` string the 1.6.1 frontend maps to an HTTP status."""
        if self.error_type is ErrorType.Backend:
            return self.backend_error.value
        return self.error_type.value

    def to_wire(self) -> dict[str, object]:
        """The serialized ``DynamoError`` of an ``Annotated`` error item, as Dynamo writes it.

        ``error_type`` is the legacy category (``{"Backend": "EngineShutdown"}`` for backend
        errors), ``class`` its canonical class, ``reason`` the catalog key that belongs to
        that class, ``message`` the text. The frontend reads the category from it.
        """
        if self.error_type is ErrorType.Backend:
            legacy: object = {"Backend": self.backend_error.value}
            canonical, reason = _BACKEND_WIRE[self.backend_error]
        else:
            legacy = _LEGACY_NAME.get(self.error_type, self.error_type.value)
            canonical, reason = _TOP_LEVEL_WIRE[self.error_type]
        return {"error_type": legacy, "class": canonical, "reason": reason, "message": self.message}

    def __repr__(self) -> str:
        return f"DynamoError({self.kind}: {self.message!r})"

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


# Canonical class and reason key of each category (Dynamo's error catalog).
_BACKEND_WIRE: dict[BackendError, tuple[str, str]] = {
    BackendError.Unknown: ("Internal", "backend.unknown"),
    BackendError.InvalidArgument: ("InvalidRequest", "backend.invalid_argument"),
    BackendError.CannotConnect: ("Unavailable", "backend.cannot_connect"),
    BackendError.Disconnected: ("Unavailable", "backend.disconnected"),
    BackendError.ConnectionTimeout: ("DeadlineExceeded", "backend.connection_timeout"),
    BackendError.ResponseTimeout: ("DeadlineExceeded", "backend.response_timeout"),
    BackendError.Cancelled: ("Cancelled", "backend.cancelled"),
    BackendError.EngineShutdown: ("Unavailable", "backend.engine_shutdown"),
    BackendError.StreamIncomplete: ("Unavailable", "backend.stream_incomplete"),
}
_TOP_LEVEL_WIRE: dict[ErrorType, tuple[str, str]] = {
    ErrorType.InvalidArgument: ("InvalidRequest", "request.invalid_argument"),
    ErrorType.CannotConnect: ("Unavailable", "transport.cannot_connect"),
    ErrorType.Disconnected: ("Unavailable", "transport.disconnected"),
    ErrorType.ConnectionTimeout: ("DeadlineExceeded", "transport.connection_timeout"),
    ErrorType.ResponseTimeout: ("DeadlineExceeded", "backend.response_timeout"),
    ErrorType.Cancelled: ("Cancelled", "request.cancelled"),
    ErrorType.ResourceExhausted: ("CapacityExhausted", "capacity.pool_exhausted"),
    ErrorType.WorkerOverloaded: ("CapacityExhausted", "capacity.worker_overloaded"),
    ErrorType.Unavailable: ("Unavailable", "backend.unavailable"),
    ErrorType.WorkerUnavailable: ("Unavailable", "backend.worker_unavailable"),
    ErrorType.Unknown: ("Internal", "runtime.unclassified"),
}
# Legacy names that the wire spells differently from ours.
_LEGACY_NAME: dict[ErrorType, str] = {ErrorType.WorkerOverloaded: "ResourceExhausted"}


def _make(kind: BackendError):
    def helper(message: str) -> DynamoError:
        return DynamoError(message, kind)

    helper.__name__ = kind.value
    helper.__doc__ = f"A ``DynamoError`` of category ``Backend({kind.value})``."
    return helper


invalid_arg = _make(BackendError.InvalidArgument)
cannot_connect = _make(BackendError.CannotConnect)
disconnected = _make(BackendError.Disconnected)
connection_timeout = _make(BackendError.ConnectionTimeout)
response_timeout = _make(BackendError.ResponseTimeout)
cancelled = _make(BackendError.Cancelled)
engine_shutdown = _make(BackendError.EngineShutdown)
stream_incomplete = _make(BackendError.StreamIncomplete)
unknown = _make(BackendError.Unknown)


def _http_status(exc: BaseException) -> int | None:
    for attr in ("code", "status", "status_code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
            return value
    return None


def from_exception(exc: BaseException) -> DynamoError:
    """Classify any exception raised by engine code (docs/contract.md#errors)."""
    if isinstance(exc, DynamoError):
        return exc
    status = _http_status(exc)
    if status is not None:
        text = next(
            (
                getattr(exc, a)
                for a in ("message", "msg", "reason")
                if isinstance(getattr(exc, a, None), str)
            ),
            f"HTTP {status}",
        )
        body = json.dumps({"message": text, "code": status})
        kind = BackendError.InvalidArgument if 400 <= status < 500 else BackendError.Unknown
        return DynamoError(body, kind)
    message = str(exc) or type(exc).__name__
    # Order matters: the connection errors are subclasses of each other and of OSError.
    if isinstance(exc, ValueError | TypeError):
        kind = BackendError.InvalidArgument
    elif isinstance(exc, TimeoutError | asyncio.TimeoutError):
        kind = BackendError.ConnectionTimeout
    elif isinstance(exc, ConnectionRefusedError):
        kind = BackendError.CannotConnect
    elif isinstance(exc, ConnectionError):
        kind = BackendError.Disconnected
    elif isinstance(exc, asyncio.CancelledError):
        kind = BackendError.Cancelled
    elif isinstance(exc, GeneratorExit):
        kind = BackendError.EngineShutdown
    else:
        kind = BackendError.Unknown
    return DynamoError(message, kind)

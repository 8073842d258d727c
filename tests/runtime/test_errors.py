"""Typed errors (contract.md §6): categories, helpers and the exception mapping of §6.3."""

from __future__ import annotations

import asyncio
import json

import pytest

from backend_common import errors
from backend_common.errors import BackendError, DynamoError, ErrorType, from_exception

BACKEND_VARIANTS = [
    "Unknown",
    "InvalidArgument",
    "CannotConnect",
    "Disconnected",
    "ConnectionTimeout",
    "ResponseTimeout",
    "Cancelled",
    "EngineShutdown",
    "StreamIncomplete",
]

HELPERS = {
    "invalid_arg": BackendError.InvalidArgument,
    "cannot_connect": BackendError.CannotConnect,
    "disconnected": BackendError.Disconnected,
    "connection_timeout": BackendError.ConnectionTimeout,
    "response_timeout": BackendError.ResponseTimeout,
    "cancelled": BackendError.Cancelled,
    "engine_shutdown": BackendError.EngineShutdown,
    "stream_incomplete": BackendError.StreamIncomplete,
    "unknown": BackendError.Unknown,
}


def test_backend_error_variants() -> None:
    assert [v.value for v in BackendError] == BACKEND_VARIANTS
    for name in BACKEND_VARIANTS:
        assert BackendError[name].value == name


def test_error_type_has_the_legacy_top_level_variants() -> None:
    for name in (
        "InvalidArgument",
        "CannotConnect",
        "Disconnected",
        "ConnectionTimeout",
        "ResponseTimeout",
        "Cancelled",
        "ResourceExhausted",
        "WorkerOverloaded",
        "Unavailable",
        "WorkerUnavailable",
        "Backend",
        "Unknown",
    ):
        assert ErrorType(name).value == name


def test_dynamo_error_defaults_and_display() -> None:
    err = DynamoError("boom")
    assert isinstance(err, Exception)
    assert err.message == "boom"
    assert err.error_type is ErrorType.Backend and err.backend_error is BackendError.Unknown
    assert err.kind == "BackendUnknown"
    assert str(err) == "BackendUnknown: boom"
    assert "boom" in repr(err)

    typed = DynamoError("bad", BackendError.InvalidArgument)
    assert typed.kind == "BackendInvalidArgument" and typed.is_invalid_argument
    assert typed.wire_error_type() == "InvalidArgument"

    top = DynamoError("busy", error_type=ErrorType.WorkerOverloaded)
    assert top.kind == "WorkerOverloaded" and top.wire_error_type() == "WorkerOverloaded"
    assert not top.is_invalid_argument
    assert DynamoError("x", error_type=ErrorType.InvalidArgument).is_invalid_argument
    # Strings are accepted for the categories (e.g. read back from config or the wire).
    assert DynamoError("x", "Disconnected").backend_error is BackendError.Disconnected
    with pytest.raises(ValueError):
        DynamoError("x", "NoSuchCategory")


@pytest.mark.parametrize(("helper", "variant"), sorted(HELPERS.items()))
def test_helpers(helper: str, variant: BackendError) -> None:
    err = getattr(errors, helper)("message text")
    assert isinstance(err, DynamoError)
    assert err.error_type is ErrorType.Backend and err.backend_error is variant
    assert err.message == "message text"
    assert err.kind == f"Backend{variant.value}"
    assert helper in errors.__all__


def test_every_backend_variant_has_a_helper() -> None:
    assert set(HELPERS.values()) == set(BackendError)


# -- §6.3 exception mapping -------------------------------------------------------------------


class _HttpCode(Exception):
    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__("str() must not be used for HTTP-like errors")
        self.code = code
        if message is not None:
            self.message = message


class _HttpStatus(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__("not this")
        self.status = status
        self.reason = reason


class _HttpMsg(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__("not this")
        self.code = code
        self.msg = msg


@pytest.mark.parametrize(
    ("exc", "variant"),
    [
        (ValueError("v"), BackendError.InvalidArgument),
        (TypeError("t"), BackendError.InvalidArgument),
        (TimeoutError("t"), BackendError.ConnectionTimeout),
        (TimeoutError(), BackendError.ConnectionTimeout),
        (ConnectionRefusedError("r"), BackendError.CannotConnect),
        (ConnectionResetError("r"), BackendError.Disconnected),
        (BrokenPipeError("p"), BackendError.Disconnected),
        (ConnectionAbortedError("a"), BackendError.Disconnected),
        (ConnectionError("c"), BackendError.Disconnected),
        (asyncio.CancelledError(), BackendError.Cancelled),
        (GeneratorExit(), BackendError.EngineShutdown),
        (RuntimeError("r"), BackendError.Unknown),
        (KeyError("k"), BackendError.Unknown),
        (OSError("o"), BackendError.Unknown),
        (Exception("e"), BackendError.Unknown),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.value,
)
def test_exception_mapping_by_type(exc: BaseException, variant: BackendError) -> None:
    err = from_exception(exc)
    assert err.error_type is ErrorType.Backend
    assert err.backend_error is variant
    assert err.message  # never empty, even for exceptions without text


def test_subclasses_map_like_their_base() -> None:
    class MyValueError(ValueError):
        pass

    class MyReset(ConnectionResetError):
        pass

    assert from_exception(MyValueError("x")).backend_error is BackendError.InvalidArgument
    assert from_exception(MyReset("x")).backend_error is BackendError.Disconnected
    # json.JSONDecodeError is a ValueError: a malformed body is the client's fault.
    try:
        json.loads("{")
    except json.JSONDecodeError as exc:
        assert from_exception(exc).backend_error is BackendError.InvalidArgument


def test_message_is_str_of_exception() -> None:
    assert from_exception(ValueError("bad max_tokens")).message == "bad max_tokens"
    assert from_exception(GeneratorExit()).message == "GeneratorExit"


def test_dynamo_error_passes_through_unchanged() -> None:
    err = errors.disconnected("peer went away")
    assert from_exception(err) is err
    top = DynamoError("busy", error_type=ErrorType.WorkerOverloaded)
    assert from_exception(top) is top


@pytest.mark.parametrize(
    ("exc", "variant", "code", "text"),
    [
        (_HttpCode(400, "bad request body"), BackendError.InvalidArgument, 400, "bad request body"),
        (_HttpCode(404), BackendError.InvalidArgument, 404, "HTTP 404"),
        (_HttpStatus(429, "slow down"), BackendError.InvalidArgument, 429, "slow down"),
        (_HttpMsg(499, "client closed"), BackendError.InvalidArgument, 499, "client closed"),
        (_HttpCode(500, "internal"), BackendError.Unknown, 500, "internal"),
        (_HttpStatus(503, "unavailable"), BackendError.Unknown, 503, "unavailable"),
    ],
)
def test_http_like_exceptions_map_by_status(
    exc: BaseException, variant: BackendError, code: int, text: str
) -> None:
    err = from_exception(exc)
    assert err.backend_error is variant
    assert json.loads(err.message) == {"message": text, "code": code}


def test_http_like_takes_precedence_over_exception_type() -> None:
    class HttpValueError(ValueError):
        code = 503
        message = "overloaded"

    assert from_exception(HttpValueError("x")).backend_error is BackendError.Unknown


def test_non_http_code_attributes_are_not_statuses() -> None:
    # SystemExit.code and similar small ints / bools are not HTTP statuses.
    assert from_exception(SystemExit(1)).backend_error is BackendError.Unknown

    class Flagged(ValueError):
        code = True

    assert from_exception(Flagged("x")).backend_error is BackendError.InvalidArgument


# -- the serialized DynamoError of a mid-stream error item ---------------------------------

# Dynamo's catalog: reason key -> the canonical class it belongs to.
CATALOG_CLASS = {
    "backend.unknown": "Internal",
    "backend.invalid_argument": "InvalidRequest",
    "backend.cannot_connect": "Unavailable",
    "backend.disconnected": "Unavailable",
    "backend.engine_shutdown": "Unavailable",
    "backend.stream_incomplete": "Unavailable",
    "backend.connection_timeout": "DeadlineExceeded",
    "backend.response_timeout": "DeadlineExceeded",
    "backend.cancelled": "Cancelled",
}


def test_every_backend_category_serializes_with_a_matching_reason() -> None:
    from backend_common.errors import BackendError, DynamoError

    for kind in BackendError:
        wire = DynamoError("m", kind).to_wire()
        assert wire["error_type"] == {"Backend": kind.value}
        assert CATALOG_CLASS[wire["reason"]] == wire["class"], kind
        assert wire["message"] == "m"


async def test_an_error_raised_mid_stream_is_a_typed_error_item() -> None:
    import json as _json

    from adapter_harness import run_request

    from backend_common.errors import engine_shutdown
    from backend_common.reference import ReferenceEngine
    from backend_common.runtime.adapter import EngineAdapter

    class Failing(ReferenceEngine):
        async def generate(self, request, ctx):
            count = 0
            async for item in super().generate(request, ctx):
                if count == 2:
                    raise engine_shutdown("gpu lost")
                yield item
                count += 1

    raw = await run_request(EngineAdapter(Failing()), {"token_ids": [1], "stop_conditions": {}})
    items = [
        _json.loads(part[part.index(b"{") :]) for part in raw.split(b"\x00") if b'"event"' in part
    ]
    (item,) = [i["data"] for i in items if "data" in i]
    assert item["event"] == "error" and item["comment"] == ["gpu lost"]
    assert item["error"] == {
        "error_type": {"Backend": "EngineShutdown"},
        "class": "Unavailable",
        "reason": "backend.engine_shutdown",
        "message": "gpu lost",
    }

"""The backend's error helpers produce the typed categories the frontend acts on."""

from __future__ import annotations

import pytest
from backend_common.errors import BackendError, DynamoError, ErrorType

from vllm_cpu_backend import errors

INVALID = [
    errors.invalid_config("--delay must be >= 0"),
    errors.empty_prompt(),
    errors.prompt_too_long(5000, 2048),
    errors.unsupported_mode("decode", ["agg"]),
]


@pytest.mark.parametrize("error", INVALID, ids=lambda e: e.message[:30])
def test_client_mistakes_are_invalid_arguments(error: DynamoError) -> None:
    # InvalidArgument: HTTP 400 at the frontend, and the worker stays in rotation.
    assert error.error_type is ErrorType.Backend
    assert error.backend_error is BackendError.InvalidArgument
    assert error.is_invalid_argument


def test_messages_carry_the_facts() -> None:
    assert "5000" in errors.prompt_too_long(5000, 2048).message
    assert "2048" in errors.prompt_too_long(5000, 2048).message
    assert "decode" in errors.unsupported_mode("decode", ["agg"]).message
    assert "agg" in errors.unsupported_mode("decode", ["agg"]).message


def test_engine_state_errors_are_not_invalid_arguments() -> None:
    assert errors.not_started().backend_error is BackendError.EngineShutdown
    unreachable = errors.engine_unreachable("the model server at 10.0.0.1:9000")
    assert unreachable.backend_error is BackendError.CannotConnect
    assert "10.0.0.1:9000" in unreachable.message
    assert not unreachable.is_invalid_argument


def test_foreign_exceptions_are_classified() -> None:
    assert errors.from_exception(ValueError("bad")).is_invalid_argument
    refused = errors.from_exception(ConnectionRefusedError("down"))
    assert refused.backend_error is BackendError.CannotConnect

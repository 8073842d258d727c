"""This backend's typed errors: one-line helpers on top of ``backend_common.errors``.

Raise them from ``from_config``, ``start`` or ``generate``. The worker sends each to the
frontend with its category: ``InvalidArgument`` becomes HTTP 400 and leaves the worker in
rotation; every other category ends the stream with an error event. Exceptions from your
engine's own libraries can be classified with ``from_exception`` (re-exported here).
"""

from __future__ import annotations

from backend_common.errors import (
    DynamoError,
    cannot_connect,
    engine_shutdown,
    from_exception,
    invalid_arg,
)

__all__ = [
    "DynamoError",
    "empty_prompt",
    "engine_unreachable",
    "from_exception",
    "invalid_config",
    "not_started",
    "prompt_too_long",
    "unsupported_mode",
]


def invalid_config(message: str) -> DynamoError:
    return invalid_arg(f"invalid configuration: {message}")


def empty_prompt() -> DynamoError:
    return invalid_arg("the request has no prompt tokens")


def prompt_too_long(prompt_tokens: int, context_length: int) -> DynamoError:
    return invalid_arg(f"prompt has {prompt_tokens} tokens; the context length is {context_length}")


def unsupported_mode(mode: str, supported: list[str]) -> DynamoError:
    return invalid_arg(
        f"disaggregation mode '{mode}' is not served here (serves: {', '.join(supported)})"
    )


def not_started() -> DynamoError:
    return engine_shutdown("the engine is not running (not started yet, or cleaned up)")


def engine_unreachable(what: str) -> DynamoError:
    return cannot_connect(f"cannot reach {what}")

"""The one place the runtime reads the environment: a setting's variable to its value.

``parser.py`` calls ``variable_text`` for the flags' defaults and ``from_env`` for the
settings without a flag; ``run`` calls ``log_filter_from_env`` / ``logging_jsonl_from_env``
before parsing, so that parsing itself logs with the operator's filter. An empty variable
counts as unset. Text the row's parser refuses is a typed ``InvalidArgument`` naming the
variable for a ``strict`` row, else a warning and the field's default.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from ..errors import invalid_arg
from .table import Setting, by_field

__all__ = [
    "PREFILL_DRAIN_TIMEOUT_S",
    "from_env",
    "health_check_payload_from_env",
    "log_filter_from_env",
    "logging_jsonl_from_env",
    "parse_text",
    "prefill_drain_timeout_from_env",
    "variable_text",
]

log = logging.getLogger(__name__)


def variable_text(setting: Setting) -> str | None:
    """The text of ``setting``'s variable; None when it has none, or it is unset or empty."""
    if setting.env is None:
        return None
    value = os.environ.get(setting.env)
    return None if value is None or value == "" else value


def parse_text(setting: Setting, raw: str) -> Any:
    """``raw`` (the variable's text) through the row's parser, as the module docstring says."""
    if setting.parse is None:
        return raw
    try:
        return setting.parse(raw)
    except ValueError as exc:
        if setting.strict:
            raise invalid_arg(f"{setting.env}={raw!r} {exc}") from None
        log.warning("%s=%r %s; using the default (%s)", setting.env, raw, exc, setting.default)
        return setting.default


def from_env(setting: Setting) -> Any:
    """The value of ``setting`` from its variable; the field's default when unset."""
    raw = variable_text(setting)
    return setting.default if raw is None else parse_text(setting, raw)


def log_filter_from_env() -> str:
    """``DYN_LOG`` (default ``info``): what ``run`` configures logging with before ``from_args``."""
    return from_env(by_field("log_filter"))


def logging_jsonl_from_env() -> bool:
    """``DYN_LOGGING_JSONL``: whether ``run`` configures JSON-line logging."""
    return from_env(by_field("logging_jsonl"))


def health_check_payload_from_env() -> dict[str, Any] | None:
    """``DYN_HEALTH_CHECK_PAYLOAD`` as the worker reads it (marker stamped), or None.

    For engines that build their own canary payload and let the operator's value replace it
    (``dynamo_compat.health_check``); the worker itself reads the variable through its row.
    """
    setting = by_field("health_check_payload")
    assert setting.to_field is not None
    return setting.to_field(from_env(setting))


PREFILL_DRAIN_TIMEOUT_S = 30.0
"""Default of ``DYN_PREFILL_DRAIN_TIMEOUT_S`` (Dynamo 1.6.1's prefill drain budget)."""


def prefill_drain_timeout_from_env() -> float:
    """``DYN_PREFILL_DRAIN_TIMEOUT_S``: seconds a prefill worker polls ``is_quiescent``.

    Dynamo 1.6.1's reading: unset, unparseable or non-finite gives the default (30 s, with a
    warning when set), a negative value gives 0. Read by ``dynamo_compat`` only.
    """
    raw = os.environ.get("DYN_PREFILL_DRAIN_TIMEOUT_S")
    if raw is None or raw == "":
        return PREFILL_DRAIN_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        log.warning("DYN_PREFILL_DRAIN_TIMEOUT_S=%r is not a number; using 30s", raw)
        return PREFILL_DRAIN_TIMEOUT_S
    return max(value, 0.0)

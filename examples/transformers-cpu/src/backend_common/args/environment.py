"""The one place the runtime reads the environment: a setting's variable to its value.

``parser.py`` calls ``variable_text`` for the flags' defaults and ``from_env`` for the
settings without a flag; ``run`` calls ``log_filter_from_env`` / ``logging_jsonl_from_env``
before parsing, so that parsing itself logs with the operator's filter. An empty variable
counts as unset. Text the row's parser refuses is a typed ``InvalidArgument`` naming the
variable for a ``strict`` row, else a warning and the field's default.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..errors import invalid_arg
from .table import Setting, by_field

__all__ = [
    "from_env",
    "log_filter_from_env",
    "logging_jsonl_from_env",
    "parse_text",
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

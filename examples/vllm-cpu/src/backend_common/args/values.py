"""The settings' value parsers: the text of a variable or flag to the value of a field.

Each parser takes the text as an operator wrote it and returns the value, or raises
``ValueError`` whose message says what is wrong with the text ("is not a number"). What
happens then is the row's choice (``Setting.strict`` in ``table.py``): a typed
``InvalidArgument`` naming the variable, or a warning and the field's default. No parser
states a default of its own: the defaults are the ``WorkerConfig`` fields'.

A parser of a flagged setting is also the flag's argparse ``type``; a ``to_field`` function
turns whatever value a setting resolved to (its own flag, an engine's flag of the same
name, the variable, the default) into the field's value.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

from ..types import mark_as_probe

__all__ = [
    "boolean",
    "codec",
    "json_object",
    "lease_ttl",
    "message_size",
    "optional_seconds",
    "otlp_protocol",
    "parse_health_check_payload",
    "seconds",
    "structural_tag",
    "structural_tag_field",
    "system_port",
    "truthy",
]

log = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_health_check_payload(value: str | None) -> dict[str, Any] | None:
    """JSON object or ``@file``. Invalid or non-object values warn and return ``None``."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        if text.startswith("@"):
            text = Path(text[1:]).read_text(encoding="utf-8")
        payload = json.loads(text)
    except (OSError, ValueError) as exc:
        log.warning("health check payload: parse failed (%s); ignored", exc)
        return None
    if not isinstance(payload, dict):
        log.warning("health check payload: value must be a JSON object; ignored")
        return None
    return mark_as_probe(payload)


def json_object(value: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """A JSON object's text (or an already parsed object) as a dict."""
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return parsed


def truthy(raw: str) -> bool:
    """1/true/yes/on is on; any other text is off (never refused)."""
    return raw.strip().lower() in _TRUE


def boolean(raw: str) -> bool:
    """1/true/yes/on or 0/false/no/off; other text is refused."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("is not a boolean")


def otlp_protocol(raw: str) -> str:
    """``grpc`` or ``http/protobuf``."""
    value = raw.strip().lower()
    if value in ("grpc", "http/protobuf"):
        return value
    raise ValueError("is not grpc or http/protobuf")


def structural_tag(value: str | dict[str, Any] | bool | None) -> dict[str, Any] | bool | None:
    """``--dyn-structural-tag``: a JSON object, or true/false as in 1.6.1 (true: defaults)."""
    if isinstance(value, bool):
        return {} if value else False
    if isinstance(value, str) and value.strip().lower() in _TRUE:
        return {}
    if isinstance(value, str) and value.strip().lower() in _FALSE:
        return False
    return json_object(value)


def structural_tag_field(value: str | dict[str, Any] | bool | None) -> dict[str, Any] | None:
    """The field's value: the settings object, or None when off or unset."""
    parsed = structural_tag(value)
    return parsed if isinstance(parsed, dict) else None


def system_port(raw: str) -> int | None:
    """A port; negative (1.6.1's default, -1) means no status server."""
    try:
        port = int(raw)
    except ValueError:
        raise ValueError("is not an integer") from None
    if port > 65535:
        raise ValueError("is not a port number")
    return port if port >= 0 else None


def seconds(raw: str) -> float:
    """Non-negative seconds: negative means 0; not a number (NaN included) is refused."""
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("is not a number") from None
    if math.isnan(value):
        raise ValueError("is not a number")
    return max(value, 0.0)


def optional_seconds(raw: str) -> float | None:
    """Positive seconds; 0 or negative turn the bound off (None)."""
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("is not a number") from None
    return value if value > 0 and not math.isnan(value) else None


def message_size(raw: str) -> int:
    """A positive number of bytes."""
    try:
        value = int(raw)
    except ValueError:
        raise ValueError("is not an integer") from None
    if value <= 0:
        raise ValueError("is not positive")
    return value


def codec(raw: str) -> str:
    """``json`` or ``msgpack`` (empty: json)."""
    value = raw.strip().lower() or "json"
    if value not in ("json", "msgpack"):
        raise ValueError("is not json or msgpack")
    return value


def lease_ttl(raw: str) -> int:
    """Whole seconds."""
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError("is not an integer") from None

"""``dynamo.common.backend.health_check``: build and recognise health-canary payloads.

Producer: ``build_health_check_payload(bos_token_id, extras=None)`` is a one-token greedy
request (``max_tokens`` 1, ``ignore_eos``, temperature 0) merged with ``extras``; an
operator's ``DYN_HEALTH_CHECK_PAYLOAD`` (JSON or ``@file``, an empty object included)
replaces it whole. Either way the ``_HEALTH_CHECK`` marker is stamped, so the request that
comes back through ``generate`` is recognised by ``is_probe`` (the marker must be the bool
``True``; ``"true"`` or ``1`` do not count). ``parse_health_check_payload_cli`` reads a
``--health-check-payload`` value the same way (``None`` and a warning when invalid).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..args import health_check_payload_from_env, parse_health_check_payload

__all__ = [
    "HEALTH_CHECK_KEY",
    "bos_token_id_or",
    "build_health_check_payload",
    "build_raw_health_check_payload",
    "is_probe",
    "parse_health_check_payload_cli",
]

HEALTH_CHECK_KEY = "_HEALTH_CHECK"


def is_probe(request: Mapping[str, Any]) -> bool:
    return request.get(HEALTH_CHECK_KEY) is True


def build_health_check_payload(
    bos_token_id: int, *, extras: dict[str, Any] | None = None
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "token_ids": [bos_token_id],
        "stop_conditions": {"max_tokens": 1, "ignore_eos": True},
        "sampling_options": {"temperature": 0.0},
    }
    payload.update(extras or {})
    return _finalize(payload)


def build_raw_health_check_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The raw-request form; kept for imports (raw engines do not run on this runtime)."""
    return _finalize(dict(payload))


def _finalize(payload: dict[str, Any]) -> dict[str, Any]:
    override = health_check_payload_from_env()
    out = dict(override if override is not None else payload)
    out[HEALTH_CHECK_KEY] = True
    return out


def bos_token_id_or(tokenizer: Any, default: int = 1) -> int:
    """``tokenizer.bos_token_id`` (or ``tokenizer.tokenizer.bos_token_id``), else ``default``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(getattr(tokenizer, "tokenizer", None), "bos_token_id", None)
    return default if bos is None else int(bos)


def parse_health_check_payload_cli(value: str | None) -> dict[str, Any] | None:
    return parse_health_check_payload(value)

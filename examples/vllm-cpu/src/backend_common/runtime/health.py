"""The health canary's payload: which request the worker sends itself.

The canary's contract: docs/contract.md#health-canary.

``resolve_health_check_payload(override, engine)`` is called once by the worker after
``setup_metrics``. Precedence, as in Dynamo's workers:

1. ``override``: ``WorkerConfig.health_check_payload`` (the ``--health-check-payload``
   flag, which itself defaults to ``DYN_HEALTH_CHECK_PAYLOAD``; both read in ``args.py``);
2. ``await engine.health_check_payload()``.

An operator payload that does not parse is dropped by ``args.py`` with a warning, so the
engine's payload is used then too.

The first one that is set wins (an operator payload fully replaces the engine's, even
``{}``). An operator payload that is not a JSON object (or does not parse) is ignored with
a warning and the engine's payload is used; an engine payload that is not a JSON object
disables the canary with a warning. The winner is stamped ``_HEALTH_CHECK: true``
(overriding a ``false``), which makes ``request.is_probe`` true in ``generate``. ``None``
means no canary: ``/health`` then reports healthy while the worker serves. When the canary
runs, and what ``/health`` reports, is the worker's (``canary.py``).

``build_health_check_payload(bos_token_id)`` is the usual engine-side payload: one token,
greedy, ``max_tokens=1``, ``ignore_eos``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..engine import LLMEngine

__all__ = [
    "HEALTH_CHECK_KEY",
    "build_health_check_payload",
    "resolve_health_check_payload",
    "stamp_canary_marker",
]

log = logging.getLogger(__name__)

HEALTH_CHECK_KEY = "_HEALTH_CHECK"


def build_health_check_payload(
    bos_token_id: int = 1, *, extras: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One-token greedy canary starting from ``bos_token_id``, plus ``extras``; stamped."""
    payload: dict[str, Any] = {
        "token_ids": [int(bos_token_id)],
        "stop_conditions": {"max_tokens": 1, "ignore_eos": True},
        "sampling_options": {"temperature": 0.0},
    }
    payload.update(extras or {})
    stamped = stamp_canary_marker(payload)
    assert stamped is not None  # a dict is always stamped
    return stamped


def stamp_canary_marker(payload: Any) -> dict[str, Any] | None:
    """A copy of ``payload`` with ``_HEALTH_CHECK: true``; None (and a warning) if not an object."""
    if payload is None:
        return None
    if not isinstance(payload, dict):
        log.warning("health_check_payload override is not a JSON object; canary disabled")
        return None
    return {**payload, HEALTH_CHECK_KEY: True}


async def resolve_health_check_payload(
    override: dict[str, Any] | None, engine: LLMEngine
) -> dict[str, Any] | None:
    """The canary payload by precedence override > engine (see the module docstring)."""
    if override is not None:
        if isinstance(override, dict):
            return stamp_canary_marker(override)
        log.warning(
            "health_check_payload override is not a JSON object; "
            "using the engine's health_check_payload()"
        )
    try:
        payload = await engine.health_check_payload()
    except Exception:  # noqa: BLE001 - a broken hook disables the canary, not the worker
        log.warning("engine.health_check_payload() failed; canary disabled", exc_info=True)
        return None
    return stamp_canary_marker(payload)

"""Helpers for engines that serve a disaggregated role (prefill or decode).

* A prefill worker generates at most one token and returns the engine's KV
  handoff in ``disaggregated_params`` on its terminal item:
  ``enforce_prefill_max_tokens(request)`` caps the request.
* A decode worker must receive the prefill peer's handoff:
  ``require_prefill_result(request, mode)`` returns it or raises a typed
  ``InvalidArgument`` (health-check probes are exempt).
"""

from __future__ import annotations

from typing import Any

from .config import DisaggregationMode
from .errors import invalid_arg
from .types import PreprocessedRequest, StopConditions

__all__ = ["enforce_prefill_max_tokens", "extract_prefill_result", "require_prefill_result"]


def enforce_prefill_max_tokens(request: PreprocessedRequest) -> None:
    if request.stop_conditions is None:
        request.stop_conditions = StopConditions()
    request.stop_conditions.max_tokens = 1


def extract_prefill_result(request: PreprocessedRequest) -> Any | None:
    result = request.prefill_result
    return None if result is None else result.disaggregated_params


def require_prefill_result(request: PreprocessedRequest, mode: DisaggregationMode) -> Any:
    if mode is not DisaggregationMode.DECODE or request.is_probe:
        return extract_prefill_result(request)
    params = extract_prefill_result(request)
    if params is None:
        raise invalid_arg(
            "decode worker received request with no prefill_result; expected the frontend's "
            "prefill router to forward disaggregated_params from a prefill peer"
        )
    return params

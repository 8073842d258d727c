"""``dynamo.common.backend.disagg``: the prefill and decode helpers 1.6.1 engines call.

* ``enforce_prefill_max_tokens(request)``: sets ``stop_conditions.max_tokens`` to 1 in place
  (a prefill worker only fills the KV cache); the caller checks the role.
* ``extract_prefill_result(request)``: the ``prefill_result`` the frontend's prefill router put
  on a decode request, or ``None``.
* ``require_prefill_result(request, mode)``: the same, raising ``ValueError`` (an
  ``InvalidArgument`` on this runtime) naming the role when it is missing.
"""

from __future__ import annotations

from typing import Any

from ..config import DisaggregationMode
from .engine import GenerateRequest

__all__ = ["enforce_prefill_max_tokens", "extract_prefill_result", "require_prefill_result"]


def enforce_prefill_max_tokens(request: GenerateRequest) -> GenerateRequest:
    stop = request.setdefault("stop_conditions", {})
    stop["max_tokens"] = 1
    return request


def extract_prefill_result(request: GenerateRequest) -> dict[str, Any] | None:
    return request.get("prefill_result")


def require_prefill_result(request: GenerateRequest, mode: DisaggregationMode) -> dict[str, Any]:
    result = extract_prefill_result(request)
    if result is None:
        raise ValueError(
            f"{mode.value} worker received request with no prefill_result: the frontend's "
            "prefill router should have forwarded disaggregated_params from a prefill worker"
        )
    return result

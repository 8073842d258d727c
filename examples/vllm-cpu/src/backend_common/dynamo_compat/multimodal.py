"""``dynamo.common.backend.multimodal``: the encoder hand-off helpers 1.6.1 engines call.

* ``extract_multimodal_kwargs(request)``: ``multi_modal_data`` / ``mm_processor_kwargs`` that
  are present and not ``None``, as a kwargs dict; ``None`` when neither is.
* ``require_encoder_result(request, mode)``: the request's ``encoder_result`` object;
  ``ValueError`` naming the role when it is missing or not a dict.
* ``encoder_terminal_chunk(result, completion_usage=None)``: an encode worker's terminal
  chunk: no tokens, ``index`` 0, ``finish_reason`` ``stop``, the result unchanged, usage only
  when given. ``TypeError`` when ``result`` is not a dict.

The payload inside ``encoder_result`` is the engine's business; only its shape (an object)
is checked here, as in 1.6.1.
"""

from __future__ import annotations

from typing import Any

from ..config import DisaggregationMode
from .engine import GenerateChunk, GenerateRequest

__all__ = ["encoder_terminal_chunk", "extract_multimodal_kwargs", "require_encoder_result"]

_MM_KEYS = ("multi_modal_data", "mm_processor_kwargs")


def extract_multimodal_kwargs(request: GenerateRequest) -> dict[str, Any] | None:
    found = {key: request.get(key) for key in _MM_KEYS if request.get(key) is not None}
    return found or None


def require_encoder_result(request: GenerateRequest, mode: DisaggregationMode) -> dict[str, Any]:
    result = request.get("encoder_result")
    if result is None:
        raise ValueError(
            f"{mode.value} worker received request with no encoder_result: the frontend "
            "should have forwarded the encoder hand-off payload from an encode worker"
        )
    if not isinstance(result, dict):
        raise ValueError(
            f"encoder_result must be a JSON object (dict), got {type(result).__name__}"
        )
    return result


def encoder_terminal_chunk(
    encoder_result: dict[str, Any], *, completion_usage: dict[str, int] | None = None
) -> GenerateChunk:
    if not isinstance(encoder_result, dict):
        raise TypeError(f"encoder_result must be a dict, got {type(encoder_result).__name__}")
    out: GenerateChunk = {
        "token_ids": [],
        "index": 0,
        "finish_reason": "stop",
        "encoder_result": encoder_result,
    }
    if completion_usage is not None:
        out["completion_usage"] = completion_usage
    return out

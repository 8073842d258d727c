"""Admission checks on a well-formed request, before it reaches ``LLMEngine.generate``.

``check_request(request, config, mode)`` is called by ``EngineAdapter`` once per request,
after the body decoded into a ``PreprocessedRequest`` (types and ranges of the wire
fields are already enforced there) and before ``generate``. It either returns the request,
possibly with ``max_tokens`` / ``min_tokens`` clamped, or raises a ``DynamoError`` of kind
``InvalidArgument``, which the adapter sends as a typed error prologue (HTTP 400 at the
frontend; the worker stays in rotation).

Policy (docs/architecture.md#bad-requests):

=============================================  ==================================================
Input                                          Result
=============================================  ==================================================
``token_ids`` empty (not in ``encode`` mode)   InvalidArgument
a token id ``>= EngineConfig.vocab_size``      InvalidArgument (only when the engine states it)
prompt ``>= EngineConfig.context_length``      InvalidArgument (no room for one output token)
``max_tokens == 0``                            InvalidArgument
``max_tokens`` beyond the context              clamped to ``context_length - len(prompt)``
``min_tokens > max_tokens``                    clamped to ``max_tokens``
a sampling float that is NaN or infinite       InvalidArgument
``temperature < 0``                            InvalidArgument
``top_p`` outside ``(0, 1]``                   InvalidArgument
``min_p`` outside ``[0, 1]``                   InvalidArgument
``top_k < -1`` (-1 and 0 mean "off")           InvalidArgument
``repetition_penalty <= 0``                    InvalidArgument
``presence``/``frequency_penalty`` outside     InvalidArgument
``[-2, 2]``
``n`` or ``best_of < 1``                       InvalidArgument
=============================================  ==================================================

Limits the engine did not state (``context_length`` / ``vocab_size`` ``None``) are not
checked. The checks are O(len(token_ids)) once per request and allocate nothing on success.
"""

from __future__ import annotations

import math

from .config import DisaggregationMode, EngineConfig
from .errors import invalid_arg
from .types import PreprocessedRequest

__all__ = ["check_request"]

_PENALTY_RANGE = (-2.0, 2.0)


def check_request(
    request: PreprocessedRequest,
    config: EngineConfig | None,
    mode: DisaggregationMode = DisaggregationMode.AGGREGATED,
) -> PreprocessedRequest:
    """Validate ``request`` against the policy above; clamp in place; return it.

    Raises ``DynamoError`` (``InvalidArgument``) naming the offending field.
    """
    tokens = request.token_ids
    if not tokens and mode is not DisaggregationMode.ENCODE:
        raise invalid_arg("token_ids is empty: the prompt must have at least one token")
    vocab = config.vocab_size if config is not None else None
    if vocab and tokens:
        top = max(tokens)
        if top >= vocab:
            raise invalid_arg(f"token id {top} is out of the vocabulary (size {vocab})")

    stop = request.stop_conditions
    max_tokens = stop.max_tokens
    if max_tokens == 0:
        raise invalid_arg("max_tokens must be at least 1")
    context = config.context_length if config is not None else None
    if context:
        room = context - len(tokens)
        if room < 1:
            raise invalid_arg(
                f"prompt of {len(tokens)} tokens leaves no room in the context of {context}"
            )
        if max_tokens is not None and max_tokens > room:
            stop.max_tokens = max_tokens = room
    if max_tokens is not None and stop.min_tokens is not None and stop.min_tokens > max_tokens:
        stop.min_tokens = max_tokens

    _check_sampling(request)
    return request


def _check_sampling(request: PreprocessedRequest) -> None:
    s = request.sampling_options
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "length_penalty",
    ):
        value = getattr(s, name)
        if value is not None and not math.isfinite(value):
            raise invalid_arg(f"sampling_options.{name} must be a finite number, got {value}")
    if s.temperature is not None and s.temperature < 0:
        raise invalid_arg(f"temperature must be >= 0, got {s.temperature}")
    if s.top_p is not None and not 0 < s.top_p <= 1:
        raise invalid_arg(f"top_p must be in (0, 1], got {s.top_p}")
    if s.min_p is not None and not 0 <= s.min_p <= 1:
        raise invalid_arg(f"min_p must be in [0, 1], got {s.min_p}")
    if s.top_k is not None and s.top_k < -1:
        raise invalid_arg(f"top_k must be >= -1 (-1 or 0: off), got {s.top_k}")
    if s.repetition_penalty is not None and s.repetition_penalty <= 0:
        raise invalid_arg(f"repetition_penalty must be > 0, got {s.repetition_penalty}")
    lo, hi = _PENALTY_RANGE
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if value is not None and not lo <= value <= hi:
            raise invalid_arg(f"{name} must be in [{lo}, {hi}], got {value}")
    for name in ("n", "best_of"):
        value = getattr(s, name)
        if value is not None and value < 1:
            raise invalid_arg(f"{name} must be >= 1, got {value}")

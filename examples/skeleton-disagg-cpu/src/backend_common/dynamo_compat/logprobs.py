"""``dynamo.common.backend.logprobs``: ``parse_logprob_options``, what 1.6.1 engines call.

``parse_logprob_options(output_options)`` returns ``(logprobs, prompt_logprobs)``: each a
non-negative int, or ``None`` when absent, empty, not an integer or negative (the bad value
is logged and ignored, as in 1.6.1). 1.6.1's converters of vLLM, TRT-LLM and SGLang output
objects into logprob arrays belong to those engines' integrations and are not provided.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["parse_logprob_options"]

log = logging.getLogger(__name__)


def parse_logprob_options(output_options: dict[str, Any]) -> tuple[int | None, int | None]:
    if not output_options:
        return None, None
    return (
        _non_negative(output_options.get("logprobs"), "logprobs"),
        _non_negative(output_options.get("prompt_logprobs"), "prompt_logprobs"),
    )


def _non_negative(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        parsed = int(value)
    except (TypeError, ValueError):
        log.warning("ignoring %s=%r: not an integer", name, value)
        return None
    if parsed < 0:
        log.warning("ignoring %s=%r: must be non-negative", name, value)
        return None
    return parsed

"""``dynamo.common.backend.logprobs``: logprob options in, Dynamo's logprob fields out.

Requests: ``parse_logprob_options(output_options)`` is ``(logprobs, prompt_logprobs)``, each
a non-negative int or ``None`` (absent, empty, not an integer or negative: logged and
ignored); ``build_sglang_logprob_kwargs`` turns the same options into SGLang's
``return_logprob`` / ``top_logprobs_num`` / ``logprob_start_len``.

Outputs, the wire fields of a chunk: ``log_probs`` (one float per token of the chunk) and
``top_logprobs`` (per token, a list of ``{rank, token_id, token, logprob[, bytes]}``), plus
prompt logprobs (per prompt position ``None`` or ``{"<token id>": {logprob[, rank]
[, decoded_token]}}``) for ``engine_data``. The converters read vLLM / TRT-LLM
``CompletionOutput``-shaped objects (``extract_from_completion_output``,
``extract_prompt_logprobs_from_completion_output``) and SGLang's ``meta_info``
(``extract_from_sglang_meta``, ``extract_prompt_logprobs_from_sglang_meta``).

Invariant: the frontend pairs ``log_probs`` and ``top_logprobs`` with ``token_ids`` by
position, so a chunk whose logprobs cannot be given for every token gets none at all
(``(None, None)``) rather than a shorter list.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "build_sglang_logprob_kwargs",
    "extract_from_completion_output",
    "extract_from_sglang_meta",
    "extract_prompt_logprobs_from_completion_output",
    "extract_prompt_logprobs_from_sglang_meta",
    "parse_logprob_options",
]

log = logging.getLogger(__name__)

NO_LOGPROBS: tuple[None, None] = (None, None)


# -- options ----------------------------------------------------------------------------------
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


def build_sglang_logprob_kwargs(output_options: dict[str, Any]) -> dict[str, Any]:
    """SGLang's generate kwargs for these options (``{}`` when none asks for logprobs).

    ``top_logprobs_num`` is the larger of the two counts; prompt logprobs also set
    ``logprob_start_len=0`` (SGLang's default computes output positions only).
    """
    wanted, prompt_wanted = parse_logprob_options(output_options)
    if wanted is None and prompt_wanted is None:
        return {}
    counts = [n for n in (wanted, prompt_wanted) if n is not None]
    kwargs: dict[str, Any] = {"return_logprob": True, "top_logprobs_num": max(counts)}
    if prompt_wanted is not None:
        kwargs["logprob_start_len"] = 0
    return kwargs


# -- vLLM / TRT-LLM outputs -------------------------------------------------------------------
def _token_text(info: Any, token_id: int, tokenizer: Any) -> str | None:
    """The engine's decoded text of ``token_id``, else the tokenizer's, else ``None``."""
    text = getattr(info, "decoded_token", None)
    if text or tokenizer is None:
        return text
    try:
        return tokenizer.decode([token_id])
    except Exception:  # noqa: BLE001 - a token without text still has its logprob
        log.debug("tokenizer.decode([%s]) failed", token_id, exc_info=True)
        return None


def _alternatives(
    position: Mapping[int, Any], tokenizer: Any, include_bytes: bool
) -> list[dict[str, Any]]:
    out = []
    for token_id, info in position.items():
        text = _token_text(info, token_id, tokenizer)
        entry: dict[str, Any] = {
            "rank": getattr(info, "rank", 0),
            "token_id": token_id,
            "token": text,
            "logprob": float(info.logprob),
        }
        if include_bytes:
            entry["bytes"] = list(text.encode("utf-8")) if text else None
        out.append(entry)
    return out


def extract_from_completion_output(
    output: Any,
    num_output_tokens_so_far: int,
    tokenizer: Any = None,
    *,
    fallback_to_first_on_missing: bool = False,
    include_bytes: bool = False,
) -> tuple[list[float] | None, list[list[dict[str, Any]]] | None]:
    """``(log_probs, top_logprobs)`` of the tokens after ``num_output_tokens_so_far``.

    ``output.logprobs`` is cumulative (one ``{token_id: Logprob}`` per generated token, or
    plain floats from TRT-LLM, which give ``log_probs`` only). The selected token's entry
    gives ``log_probs``; missing, it makes the chunk ``(None, None)`` unless
    ``fallback_to_first_on_missing`` takes the position's first entry. ``tokenizer`` decodes
    tokens the engine left without text; ``include_bytes`` adds UTF-8 bytes per entry.
    """
    cumulative = getattr(output, "logprobs", None)
    if not cumulative:  # None, or TRT-LLM's [] when none were asked for: leave token_ids alone
        return NO_LOGPROBS
    token_ids = list(getattr(output, "token_ids", None) or [])
    fresh_ids = token_ids[num_output_tokens_so_far:]
    positions = list(cumulative[num_output_tokens_so_far : len(token_ids)])
    if not fresh_ids or not positions:
        return NO_LOGPROBS
    if isinstance(positions[0], float):
        return [float(value) for value in positions], None
    selected_logprobs: list[float] = []
    alternatives: list[list[dict[str, Any]]] = []
    for token_id, position in zip(fresh_ids, positions, strict=False):
        if position is None:
            return NO_LOGPROBS
        chosen = position.get(token_id)
        if chosen is None and fallback_to_first_on_missing:
            chosen = next(iter(position.values()), None)
        if chosen is None:
            return NO_LOGPROBS
        selected_logprobs.append(float(chosen.logprob))
        alternatives.append(_alternatives(position, tokenizer, include_bytes))
    return selected_logprobs or None, alternatives or None


def extract_prompt_logprobs_from_completion_output(
    output: Any, tokenizer: Any = None
) -> list[dict[str, dict[str, Any]] | None] | None:
    """``output.prompt_logprobs`` in the wire form; ``None`` when the engine computed none.

    A ``None`` position (the first prompt token has no logprob) stays ``None``; token ids
    become string keys (the payload is JSON).
    """
    positions = getattr(output, "prompt_logprobs", None)
    if not positions:
        return None
    payload: list[dict[str, dict[str, Any]] | None] = []
    for position in positions:
        if position is None:
            payload.append(None)
            continue
        entries: dict[str, dict[str, Any]] = {}
        for token_id, info in position.items():
            entry: dict[str, Any] = {"logprob": float(info.logprob)}
            rank = getattr(info, "rank", None)
            if rank is not None:
                entry["rank"] = int(rank)
            text = _token_text(info, token_id, tokenizer)
            if text is not None:
                entry["decoded_token"] = text
            entries[str(token_id)] = entry
        payload.append(entries)
    return payload


# -- SGLang meta_info ---------------------------------------------------------------------------
def _sglang_entry(logprob: float, text: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"logprob": float(logprob)}
    if text is not None:
        entry["decoded_token"] = text
    return entry


def extract_prompt_logprobs_from_sglang_meta(
    meta: dict[str, Any],
) -> list[dict[str, dict[str, Any]] | None] | None:
    """Prompt logprobs from ``input_token_logprobs`` (``(logprob, token_id, text)``), with the
    ``input_top_logprobs`` alternatives of each position merged in (the selected token's own
    entry wins). A position whose logprob is ``None`` (the first one) stays ``None``.
    """
    selected: Sequence[Any] = meta.get("input_token_logprobs") or []
    if not selected:
        return None
    tops: Sequence[Any] = meta.get("input_top_logprobs") or []
    payload: list[dict[str, dict[str, Any]] | None] = []
    for index, (logprob, token_id, text) in enumerate(selected):
        if logprob is None:
            payload.append(None)
            continue
        entries = {str(token_id): _sglang_entry(logprob, text)}
        for alt_logprob, alt_id, alt_text in (tops[index] if index < len(tops) else None) or []:
            entries.setdefault(str(alt_id), _sglang_entry(alt_logprob, alt_text))
        payload.append(entries)
    return payload


def extract_from_sglang_meta(
    meta_info: dict[str, Any], *, return_tokens_as_token_ids: bool = False
) -> tuple[list[float] | None, list[list[dict[str, Any]]] | None]:
    """``(log_probs, top_logprobs)`` of one incremental SGLang chunk.

    With incremental streaming, ``output_token_logprobs`` / ``output_top_logprobs`` already
    cover exactly this chunk's tokens. Ranks count from 1 in SGLang's order; a position
    without alternatives is an empty list (positions stay aligned);
    ``return_tokens_as_token_ids`` spells each token ``token_id:<id>``.
    """
    selected = meta_info.get("output_token_logprobs")
    if not selected:
        return NO_LOGPROBS
    log_probs = [float(item[0]) for item in selected]
    tops = meta_info.get("output_top_logprobs")
    if not tops:
        return log_probs, None
    alternatives = []
    for position in tops:
        row = []
        for rank, (logprob, token_id, text) in enumerate(position or [], start=1):
            token = f"token_id:{token_id}" if return_tokens_as_token_ids else text
            row.append(
                {"rank": rank, "token_id": token_id, "token": token, "logprob": float(logprob)}
            )
        alternatives.append(row)
    return log_probs, alternatives

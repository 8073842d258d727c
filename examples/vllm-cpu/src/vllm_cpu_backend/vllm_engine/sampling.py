"""A Dynamo request as vLLM ``SamplingParams``, and vLLM's outputs as Dynamo output fields.

``sampling_params(request, limits)`` maps exactly, and refuses with a typed
``InvalidArgument`` (HTTP 400) what vLLM would do differently from what was asked:

* ``sampling_options``: temperature, top_p, top_k, min_p, seed, repetition / frequency /
  presence penalties one to one; ``n`` and ``best_of`` above 1, beam search and a length
  penalty are refused (one sequence per request on this path);
* ``stop_conditions``: ``max_tokens`` clamped to what fits in the context (absent: all of
  it); a prompt that leaves no room is refused; ``min_tokens``, ``ignore_eos`` as is;
  ``stop_token_ids`` / ``stop_token_ids_hidden`` / ``stop_token_ids_visible`` all become
  vLLM stop token ids (the frontend hides the hidden ones); stop strings stay with the
  frontend (it matches them on the text it detokenizes); ``max_thinking_tokens`` is refused;
* guided decoding (``json`` schema, ``regex``, ``choice``, ``grammar``, ``structural_tag``,
  ``whitespace_pattern``) becomes vLLM's ``StructuredOutputsParams``; a per-request
  ``backend`` other than the engine's is refused;
* ``output_options``: ``logprobs`` (top-k per generated token) and ``prompt_logprobs``.

Token ids in, token ids out: ``detokenize=False`` and ``RequestOutputKind.DELTA`` (each
output holds only the tokens of its step). vLLM's own validation (``SamplingParams``
constructor, e.g. ``top_p`` out of range) raises ``ValueError`` or ``VLLMClientError``: also
``InvalidArgument``.

``logprob_fields(completion)`` turns one delta's ``CompletionOutput.logprobs`` into the
``log_probs`` / ``top_logprobs`` fields the frontend reads (docs/wire-protocol.md);
``prompt_logprob_entries(request_output)`` the prompt logprobs carried in ``engine_data``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from backend_common import PreprocessedRequest
from backend_common.errors import invalid_arg
from vllm import SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

__all__ = ["Limits", "logprob_fields", "prompt_logprob_entries", "sampling_params"]


@dataclass(frozen=True)
class Limits:
    """What the live engine allows, read once at ``start``."""

    context_length: int
    vocab_size: int
    structured_outputs_backend: str = "auto"
    max_logprobs: int = 20


def _guided(request: PreprocessedRequest, limits: Limits) -> StructuredOutputsParams | None:
    guided = request.sampling_options.guided_decoding
    if guided is None:
        return None
    if guided.backend and guided.backend not in ("auto", limits.structured_outputs_backend):
        raise invalid_arg(
            f"guided_decoding.backend {guided.backend!r} is not this engine's "
            f"({limits.structured_outputs_backend!r}; set with vLLM's "
            "--structured-outputs-config)"
        )
    schema = guided.json_schema
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise invalid_arg(f"guided_decoding.json is not valid JSON: {exc}") from None
    structural_tag = guided.structural_tag
    if structural_tag is not None and not isinstance(structural_tag, str):
        structural_tag = json.dumps(structural_tag)
    fields = {
        "json": schema,
        "regex": guided.regex,
        "choice": guided.choice,
        "grammar": guided.grammar,
        "structural_tag": structural_tag,
    }
    if all(v is None for v in fields.values()):
        return None
    try:
        return StructuredOutputsParams(
            **{k: v for k, v in fields.items() if v is not None},
            whitespace_pattern=guided.whitespace_pattern,
        )
    except (ValueError, VLLMClientError) as exc:
        raise invalid_arg(f"guided_decoding: {exc}") from None


def sampling_params(request: PreprocessedRequest, limits: Limits) -> SamplingParams:
    """The exact ``SamplingParams`` of ``request``; ``InvalidArgument`` for what vLLM cannot do."""
    so, sc, oo = request.sampling_options, request.stop_conditions, request.output_options
    if (so.n or 1) != 1:
        raise invalid_arg(f"n={so.n}: this engine returns one choice per request (n=1)")
    if (so.best_of or 1) != 1:
        raise invalid_arg(f"best_of={so.best_of} is not supported (best_of=1)")
    if so.use_beam_search:
        raise invalid_arg("beam search is not supported by this engine")
    if so.length_penalty is not None and so.length_penalty != 1.0:
        raise invalid_arg("length_penalty applies to beam search, which is not supported")
    if sc.max_thinking_tokens is not None:
        raise invalid_arg("max_thinking_tokens is not supported by this engine")
    prompt_len = len(request.token_ids)
    if prompt_len == 0:
        raise invalid_arg("the prompt is empty (no token ids)")
    room = limits.context_length - prompt_len
    if room <= 0:
        raise invalid_arg(
            f"the prompt has {prompt_len} tokens; this model's context is "
            f"{limits.context_length} tokens (prompt + output)"
        )
    max_tokens = room if sc.max_tokens is None else min(sc.max_tokens, room)
    if sc.min_tokens is not None and sc.min_tokens > max_tokens:
        raise invalid_arg(f"min_tokens={sc.min_tokens} exceeds max_tokens={max_tokens}")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(oo, name)
        if value is not None and value > limits.max_logprobs:
            raise invalid_arg(
                f"{name}={value} exceeds this engine's --max-logprobs ({limits.max_logprobs})"
            )
    stop_ids = sorted(
        {
            *(sc.stop_token_ids or ()),
            *(sc.stop_token_ids_hidden or ()),
            *(sc.stop_token_ids_visible or ()),
        }
    )
    values: dict[str, Any] = {
        "n": 1,
        "temperature": so.temperature,
        "top_p": so.top_p,
        "top_k": so.top_k,
        "min_p": so.min_p,
        "seed": so.seed,
        "presence_penalty": so.presence_penalty,
        "frequency_penalty": so.frequency_penalty,
        "repetition_penalty": so.repetition_penalty,
        "min_tokens": sc.min_tokens,
        "ignore_eos": sc.ignore_eos,
        "logprobs": oo.logprobs,
        "prompt_logprobs": oo.prompt_logprobs,
    }
    try:
        return SamplingParams(
            **{k: v for k, v in values.items() if v is not None},
            max_tokens=max_tokens,
            stop_token_ids=stop_ids or None,
            structured_outputs=_guided(request, limits),
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )
    except (ValueError, VLLMClientError) as exc:
        raise invalid_arg(str(exc)) from None


def _finite(value: float) -> float:
    # JSON has no -inf; the frontend expects a number (a masked token has -inf).
    return value if math.isfinite(value) else -9999.0


def logprob_fields(completion: Any) -> tuple[list[float] | None, list[list[dict[str, Any]]] | None]:
    """``(log_probs, top_logprobs)`` of one delta ``CompletionOutput`` (``None, None``: none).

    ``log_probs[i]`` is the logprob of ``token_ids[i]``; ``top_logprobs[i]`` lists vLLM's
    entries for that position (the sampled token and the top-k) with ``rank``,
    ``token_id``, ``token`` (None: the frontend decodes ids) and ``logprob``.
    """
    entries = completion.logprobs
    token_ids = list(completion.token_ids)
    if not entries or len(entries) < len(token_ids):
        return None, None
    log_probs: list[float] = []
    top: list[list[dict[str, Any]]] = []
    for token_id, position in zip(token_ids, entries, strict=False):
        chosen = position.get(token_id)
        if chosen is None:
            return None, None
        log_probs.append(_finite(chosen.logprob))
        top.append(
            [
                {
                    "rank": info.rank,
                    "token_id": tid,
                    "token": info.decoded_token,
                    "logprob": _finite(info.logprob),
                }
                for tid, info in position.items()
            ]
        )
    return log_probs, top


def prompt_logprob_entries(request_output: Any) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's ``prompt_logprobs`` as Dynamo carries them (``engine_data.prompt_logprobs``).

    One entry per prompt position (the first is None: nothing precedes it); keys are token
    ids as strings, so the JSON round trip to the frontend keeps them.
    """
    raw = getattr(request_output, "prompt_logprobs", None)
    if not raw:
        return None
    out: list[dict[str, dict[str, Any]] | None] = []
    for position in raw:
        if position is None:
            out.append(None)
            continue
        out.append(
            {
                str(tid): {"logprob": _finite(info.logprob), "rank": info.rank}
                for tid, info in position.items()
            }
        )
    return out

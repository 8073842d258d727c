"""The values that cross the engine contract: requests in, output items out.

Field names are Dynamo 1.6.x's JSON wire names, so a request decoded from the
frontend and an item encoded for it need no translation layer.

* ``PreprocessedRequest`` is what ``LLMEngine.generate`` receives. It is a
  pydantic model that keeps unknown fields (the frontend adds fields every
  release) and defaults missing ones; it never rejects a request for a field it
  does not know.
* ``LLMEngineOutput`` is what ``generate`` yields. A plain slotted class rather
  than a pydantic model: one is built per token, so it must cost next to
  nothing. ``to_dict()`` gives the wire form the frontend accepts.
* ``FinishReason`` set on an output makes it the terminal item of a stream.
"""

from __future__ import annotations

import operator
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "HEALTH_CHECK_KEY",
    "BootstrapInfo",
    "FinishReason",
    "GuidedDecodingOptions",
    "LLMEngineOutput",
    "OutputOptions",
    "PrefillResult",
    "PreprocessedRequest",
    "RoutingHints",
    "SamplingOptions",
    "StopConditions",
    "chunk",
    "mark_as_probe",
    "usage",
]

U32_MAX = 2**32 - 1
# The largest unsigned 64-bit wire integer: instance ids, KV block hashes (taken modulo 2**64).
U64_MAX = 2**64 - 1

# Integer and bool wire fields are strict, like Dynamo's serde types: "1", 1.0, true
# or -1 for a token id is a client error (ValidationError -> InvalidArgument), not a
# value to coerce and hand to an engine that would index a vocabulary with it.
U32 = Annotated[int, Field(strict=True, ge=0, le=U32_MAX)]
StrictBool = Annotated[bool, Field(strict=True)]


class FinishReason(StrEnum):
    """Why a stream ended. Wire strings are Dynamo's serde names."""

    EOS = "eos"
    LENGTH = "length"
    STOP = "stop"
    ERROR = "error"
    CANCELLED = "cancelled"
    CONTENT_FILTER = "content_filter"

    @classmethod
    def _missing_(cls, value: object) -> FinishReason | None:
        # Python engines of Dynamo yield "abort"; the Rust layer reads it as Cancelled.
        if isinstance(value, str):
            v = value.strip().lower()
            if v == "abort":
                return cls.CANCELLED
            for member in cls:
                if member.value == v:
                    return member
        return None


class _Lenient(BaseModel):
    """Base for wire objects: unknown keys are kept, so nothing is lost on re-encode."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class GuidedDecodingOptions(_Lenient):
    json_schema: Any = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    backend: str | None = None
    whitespace_pattern: str | None = None
    structural_tag: Any = None


class StopConditions(_Lenient):
    max_tokens: U32 | None = None
    stop: list[str] | None = None
    stop_token_ids: list[U32] | None = None
    stop_token_ids_visible: list[U32] | None = None
    stop_token_ids_hidden: list[U32] | None = None
    min_tokens: U32 | None = None
    ignore_eos: StrictBool | None = None
    max_thinking_tokens: U32 | None = None


class SamplingOptions(_Lenient):
    n: int | None = None
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    seed: int | None = None
    include_stop_str_in_output: bool | None = None
    guided_decoding: GuidedDecodingOptions | None = None


class OutputOptions(_Lenient):
    logprobs: U32 | None = None
    prompt_logprobs: U32 | None = None
    skip_special_tokens: StrictBool | None = None
    formatted_prompt: StrictBool | None = None
    return_tokens_as_token_ids: StrictBool | None = None


class RoutingHints(_Lenient):
    backend_instance_id: int | None = None
    prefill_worker_id: int | None = None
    decode_worker_id: int | None = None
    dp_rank: U32 | None = None
    prefill_dp_rank: U32 | None = None
    expected_output_tokens: U32 | None = None
    lora_name: str | None = None
    cache_salt: str | None = None


class PrefillResult(_Lenient):
    disaggregated_params: Any = None
    prompt_tokens_details: Any = None


class BootstrapInfo(_Lenient):
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None
    handoff_id: str | None = None


class PreprocessedRequest(_Lenient):
    """A tokenized request as the Dynamo 1.6.x frontend sends it.

    Only ``token_ids`` is required. ``_HEALTH_CHECK`` (the canary marker) is
    exposed as ``is_probe``. ``to_dict()`` re-encodes exactly the keys that were
    received (explicit nulls included) plus any set later.
    """

    model: str = ""
    token_ids: list[U32]
    stop_conditions: StopConditions = Field(default_factory=StopConditions)
    sampling_options: SamplingOptions = Field(default_factory=SamplingOptions)
    output_options: OutputOptions = Field(default_factory=OutputOptions)
    eos_token_ids: list[U32] = Field(default_factory=list)
    mdc_sum: str | None = None
    annotations: list[str] = Field(default_factory=list)
    routing: RoutingHints | None = None
    router_config_override: Any = None
    prefill_result: PrefillResult | None = None
    bootstrap_info: BootstrapInfo | None = None
    # Dynamo rejects a non-object encoder_result at deserialisation; so do we.
    encoder_result: dict[str, Any] | None = None
    extra_args: Any = None
    # The canary marker's wire name is written here only (``HEALTH_CHECK_KEY``).
    is_probe: StrictBool = Field(default=False, alias="_HEALTH_CHECK")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessedRequest:
        """Validate a decoded wire body; raises ``pydantic.ValidationError`` on bad types."""
        return cls.model_validate(data)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)

    @property
    def max_tokens(self) -> int | None:
        return self.stop_conditions.max_tokens

    @property
    def dp_rank(self) -> int | None:
        return self.routing.dp_rank if self.routing is not None else None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """A ``completion_usage`` object; the total saturates at u32::MAX like Dynamo's."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": min(prompt_tokens + completion_tokens, U32_MAX),
    }


class LLMEngineOutput:
    """One item of a ``generate`` stream.

    Non-terminal items carry tokens and no ``finish_reason``; the terminal item
    (exactly one, last) has ``finish_reason`` set and may carry tokens and usage.
    Build them with ``chunk.token(id)`` and the terminal constructors
    ``stop() / length() / cancelled() / error(msg)``, then the fluent
    ``with_tokens`` / ``with_usage``.
    """

    __slots__ = (
        "token_ids",
        "finish_reason",
        "error_message",
        "completion_usage",
        "index",
        "text",
        "tokens",
        "log_probs",
        "top_logprobs",
        "cum_log_probs",
        "disaggregated_params",
        "encoder_result",
        "extra_args",
        "engine_data",
        "stop_reason",
        "output_type",
    )

    # Fields serialized by name when set; finish_reason and error are handled apart.
    _PLAIN = (
        "tokens",
        "text",
        "cum_log_probs",
        "log_probs",
        "top_logprobs",
        "stop_reason",
        "index",
        "disaggregated_params",
        "encoder_result",
        "extra_args",
        "completion_usage",
        "engine_data",
        "output_type",
    )

    # 1.6.1 fields that are framework-owned or derived downstream: accepted by
    # ``from_dict`` (a real worker may send them) but not kept.
    _IGNORED = frozenset({"content_parts", "worker_trace_link", "routing_data", "jailed_text"})

    def __init__(
        self,
        token_ids: list[int] | None = None,
        finish_reason: FinishReason | str | None = None,
        *,
        completion_usage: dict[str, Any] | None = None,
        index: int | None = None,
        text: str | None = None,
        tokens: list[str | None] | None = None,
        log_probs: list[float] | None = None,
        top_logprobs: list[list[dict[str, Any]]] | None = None,
        cum_log_probs: float | None = None,
        disaggregated_params: Any = None,
        encoder_result: dict[str, Any] | None = None,
        extra_args: Any = None,
        engine_data: Any = None,
        stop_reason: str | int | None = None,
        error_message: str | None = None,
        output_type: str | None = None,
    ) -> None:
        self.token_ids = token_ids if token_ids is not None else []
        if finish_reason is not None and not isinstance(finish_reason, FinishReason):
            finish_reason = FinishReason(finish_reason)
        self.finish_reason = finish_reason
        self.error_message = error_message
        self.completion_usage = completion_usage
        self.index = index
        self.text = text
        self.tokens = tokens
        self.log_probs = log_probs
        self.top_logprobs = top_logprobs
        self.cum_log_probs = cum_log_probs
        self.disaggregated_params = disaggregated_params
        self.encoder_result = encoder_result
        self.extra_args = extra_args
        self.engine_data = engine_data
        self.stop_reason = stop_reason
        # None and "text" mean the same on the wire; only a media type is worth sending.
        self.output_type = None if output_type == "text" else output_type

    # -- terminal constructors -------------------------------------------------
    @classmethod
    def stop(cls) -> LLMEngineOutput:
        return cls(finish_reason=FinishReason.STOP)

    @classmethod
    def length(cls) -> LLMEngineOutput:
        return cls(finish_reason=FinishReason.LENGTH)

    @classmethod
    def eos(cls) -> LLMEngineOutput:
        return cls(finish_reason=FinishReason.EOS)

    @classmethod
    def cancelled(cls) -> LLMEngineOutput:
        return cls(finish_reason=FinishReason.CANCELLED)

    @classmethod
    def error(cls, message: str) -> LLMEngineOutput:
        """String-form error terminal; raise a ``DynamoError`` instead to keep the category."""
        return cls(finish_reason=FinishReason.ERROR, error_message=message)

    @classmethod
    def encode_terminal(cls, encoder_result: dict[str, Any]) -> LLMEngineOutput:
        if not isinstance(encoder_result, dict):
            raise TypeError("encoder_result must be a JSON object (dict)")
        return cls(finish_reason=FinishReason.STOP, index=0, encoder_result=encoder_result)

    # -- fluent setters ----------------------------------------------------------
    def with_tokens(self, token_ids: list[int]) -> LLMEngineOutput:
        self.token_ids = list(token_ids)
        return self

    def with_usage(self, completion_usage: dict[str, Any]) -> LLMEngineOutput:
        self.completion_usage = completion_usage
        return self

    def with_encoder_result(self, encoder_result: dict[str, Any]) -> LLMEngineOutput:
        if not isinstance(encoder_result, dict):
            raise TypeError("encoder_result must be a JSON object (dict)")
        self.encoder_result = encoder_result
        return self

    def with_disaggregated_params(self, params: Any) -> LLMEngineOutput:
        self.disaggregated_params = params
        return self

    # -- queries -------------------------------------------------------------------
    @property
    def is_terminal(self) -> bool:
        return self.finish_reason is not None

    def plain_token_ids(self) -> list[int] | None:
        """``token_ids`` when the item carries nothing else (the per-token hot path), else None.

        The worker sends such items with ``codec.token_item_frame``, byte for byte what
        ``to_dict`` + ``item_frame`` would produce, without building the dict.
        """
        if _rest_of(self) == _NOTHING_ELSE:
            return self.token_ids
        return None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LLMEngineOutput) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"LLMEngineOutput({self.to_dict()!r})"

    # -- wire --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The minimal wire form: ``token_ids`` plus every field that is set."""
        out: dict[str, Any] = {"token_ids": self.token_ids}
        fr = self.finish_reason
        if fr is not None:
            if fr is FinishReason.ERROR:
                out["finish_reason"] = {"error": self.error_message or ""}
            else:
                out["finish_reason"] = fr.value
        for name in self._PLAIN:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LLMEngineOutput:
        """Parse the wire form (minimal or 1.6.1's full form with explicit nulls)."""
        if not isinstance(data, dict):
            raise ValueError(f"invalid chunk shape: expected an object, got {type(data).__name__}")
        unknown = set(data) - {"token_ids", "finish_reason", *cls._PLAIN} - cls._IGNORED
        if unknown:
            raise ValueError(f"invalid chunk shape: unknown keys {sorted(unknown)}")
        token_ids = data.get("token_ids")
        if token_ids is None:
            token_ids = []
        if not isinstance(token_ids, list) or not all(
            type(t) is int and 0 <= t <= U32_MAX for t in token_ids
        ):
            raise ValueError("invalid chunk shape: token_ids must be a list of u32 integers")
        fr = data.get("finish_reason")
        error_message = None
        if isinstance(fr, dict):
            # The newtype variant `{"error": "<msg>"}` is the only object form.
            if set(fr) != {"error"} or not isinstance(fr["error"], str):
                raise ValueError(f"invalid chunk shape: unknown finish_reason {fr!r}")
            error_message = fr["error"]
            fr = FinishReason.ERROR
        elif fr is not None:
            try:
                fr = FinishReason(fr)
            except ValueError:
                raise ValueError(f"invalid chunk shape: unknown finish_reason {fr!r}") from None
        kwargs = {name: data.get(name) for name in cls._PLAIN}
        return cls(list(token_ids), fr, error_message=error_message, **kwargs)


_rest_of = operator.attrgetter("finish_reason", *LLMEngineOutput._PLAIN)
_NOTHING_ELSE = (None,) * (1 + len(LLMEngineOutput._PLAIN))


class chunk:  # noqa: N801 - mirrors Dynamo's `chunk::token(id)` helper
    """Non-terminal item helpers: ``chunk.token(id)`` / ``chunk.tokens(ids)``."""

    @staticmethod
    def token(token_id: int) -> LLMEngineOutput:
        return LLMEngineOutput([token_id])

    @staticmethod
    def tokens(token_ids: list[int]) -> LLMEngineOutput:
        return LLMEngineOutput(list(token_ids))


# The request field that marks a health canary (``PreprocessedRequest.is_probe``).
HEALTH_CHECK_KEY = str(PreprocessedRequest.model_fields["is_probe"].alias)


def mark_as_probe(payload: dict[str, Any]) -> dict[str, Any]:
    """A copy of the request body ``payload`` marked as a health canary (``is_probe``).

    The one place the marker is written: the operator's payload (``args.py``) and the
    worker's resolved canary payload (``runtime/health.py``) both go through it.
    """
    return {**payload, HEALTH_CHECK_KEY: True}

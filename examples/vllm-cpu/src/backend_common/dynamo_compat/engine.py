"""The 1.6.1 engine interface (``dynamo.common.backend.engine``), for engines written to it.

An engine author subclasses ``LLMEngine`` exactly as for Dynamo 1.6.1:

* ``from_args(argv)`` (async classmethod) returns ``(engine, WorkerConfig)``;
* ``start(worker_id)`` returns an ``EngineConfig`` whose ``llm`` is an ``LlmRegistration``;
* ``generate(request, context)`` is an async generator: ``request`` is the 1.6.1 request
  dict (``GenerateRequest``), each yielded item a chunk dict (``GenerateChunk``: ``token_ids``
  and ``index``, the last one also ``finish_reason``);
* optional hooks with 1.6.1's defaults: ``abort``, ``is_quiescent``, ``health_check_payload``,
  ``kv_event_sources``, ``component_metrics_dp_ranks``, ``attach_snapshot_publisher``,
  ``register_prometheus``, ``logits_processor_spec``, the engine control and update routes
  and ``on_endpoint_ready``;
* ``cleanup()`` once on shutdown, null-safe.

The class is not a ``backend_common.LLMEngine``: ``dynamo_compat.adapter.DynamoEngineAdapter``
wraps an instance into one, and ``dynamo_compat.run`` does that for the worker. Which hooks
map onto the worker, and which ones stop the worker at start because nothing here serves them,
is the table in docs/dynamo-compat.md. ``RawEngine`` and ``DiffusionEngine`` exist so that
imports resolve; such an engine is refused at start.

The logits-processor records and helpers (``LogitsProcessorSpec``, ``ForcedTokenSequenceSpec``,
``logits_processors_for_request``, the serializers) behave as 1.6.1's; an engine whose
``logits_processor_spec()`` returns a spec is refused at start, since this runtime carries no
processor activation to the engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Required, TypedDict

from ..config import DisaggregationMode
from .core import Context

if TYPE_CHECKING:
    from .publisher import KvEventSource
    from .worker import WorkerConfig

__all__ = [
    "BaseEngine",
    "DiffusionEngine",
    "EngineConfig",
    "ForcedTokenSequenceSpec",
    "GenerateChunk",
    "GenerateRequest",
    "LLMEngine",
    "LlmRegistration",
    "LogitsProcessorSpec",
    "PythonProcessorSpec",
    "RawEngine",
    "RawRequest",
    "RawResponseChunk",
    "deserialize_logits_processor_entries",
    "is_generation_stage",
    "logits_processors_for_request",
    "serialize_logits_processor_entries",
]


class GenerateRequest(TypedDict, total=False):
    """The request dict ``generate`` receives: the frontend's fields, unknown keys kept."""

    token_ids: Required[list[int]]
    model: str
    sampling_options: dict[str, Any]
    stop_conditions: dict[str, Any]
    output_options: dict[str, Any]
    require_reasoning: bool
    prefill_result: dict[str, Any]
    bootstrap_info: dict[str, Any]
    multi_modal_data: dict[str, Any]
    mm_processor_kwargs: dict[str, Any]
    mm_routing_info: dict[str, Any]
    encoder_result: dict[str, Any]
    extra_args: dict[str, Any]
    routing: dict[str, Any]


class GenerateChunk(TypedDict, total=False):
    """One yielded item. ``token_ids`` and ``index`` always; ``finish_reason`` on the last."""

    token_ids: Required[list[int]]
    index: Required[int]
    finish_reason: str
    completion_usage: dict[str, Any]
    disaggregated_params: dict[str, Any]
    encoder_result: dict[str, Any]
    log_probs: list[float]
    top_logprobs: list[list[dict[str, Any]]]
    engine_data: dict[str, Any]


@dataclass
class LlmRegistration:
    """Token-pipeline facts of ``EngineConfig.llm``; ``None`` means "not advertised"."""

    context_length: int | None = None
    kv_cache_block_size: int | None = None
    total_kv_blocks: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    data_parallel_size: int | None = None
    data_parallel_start_rank: int | None = None
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    enable_eagle: bool = False
    max_gpu_lora_count: int | None = None


@dataclass
class EngineConfig:
    """What ``start`` returns (1.6.1's field order, so positional construction matches)."""

    model: str
    served_model_name: str | None = None
    runtime_data: dict[str, Any] | None = None
    llm: LlmRegistration | None = None
    model_aliases: list[str] = field(default_factory=list)


class BaseEngine(ABC):
    """The lifecycle every 1.6.1 engine shares (see the module docstring for the call order)."""

    @classmethod
    @abstractmethod
    async def from_args(cls, argv: list[str] | None = None) -> tuple[BaseEngine, WorkerConfig]:
        """Parse ``argv`` (``None``: ``sys.argv[1:]``) into an engine, not started, and config."""

    @abstractmethod
    async def start(self, worker_id: int) -> EngineConfig:
        """Start; afterwards ``generate`` must accept concurrent calls. Called once."""

    async def abort(self, context: Context) -> None:  # noqa: B027 - optional hook
        """A cancelled request (client gone or stop). Default: nothing."""

    async def is_quiescent(self) -> bool | None:
        """Prefill workers, during shutdown: are KV transfers done? ``None``: cannot tell."""
        return None

    @abstractmethod
    async def cleanup(self) -> None:
        """Release everything; null-safe (also runs after a failed ``start``)."""

    async def register_prometheus(self, metrics: Any) -> None:  # noqa: B027 - optional hook
        """Bridge an engine-owned Prometheus registry into ``/metrics``. Default: nothing."""

    def component_metrics_dp_ranks(self) -> list[int]:
        """Ranks this engine pushes ``ComponentSnapshot``\\ s for. Default: none."""
        return []

    def attach_snapshot_publisher(self, publisher: Any) -> None:  # noqa: B027 - optional hook
        """Keep ``publisher``; call ``publisher.publish(rank, snapshot)`` from any thread."""

    async def health_check_payload(self) -> dict[str, Any] | None:
        """The canary request the worker may send through ``generate``; ``None``: none."""
        return None

    def supported_controls(self) -> set[str]:
        """Engine-control keys this engine serves (none run on this runtime). Default: none."""
        return set()

    async def engine_control(self, control: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"status": "error", "message": f"unsupported engine control: {control}"}

    def supported_updates(self) -> set[str]:
        """Engine-update keys this engine serves (none run on this runtime). Default: none."""
        return set()

    async def engine_update(self, update: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"status": "error", "message": f"unsupported engine update: {update}"}

    async def on_endpoint_ready(self, endpoint: Any) -> None:
        """1.6.1 hands the serving ``Endpoint`` here; this runtime has none to hand."""
        return None


class LLMEngine(BaseEngine):
    """A token-in, chunk-dict-out engine (see the module docstring)."""

    @abstractmethod
    def generate(
        self, request: GenerateRequest, context: Context
    ) -> AsyncGenerator[GenerateChunk, None]:
        """Yield chunk dicts for one request; called concurrently."""

    async def kv_event_sources(self) -> list[KvEventSource]:
        """One ``PushSource`` or ``ZmqSource`` per data-parallel rank. Default: none."""
        return []

    async def logits_processor_spec(self) -> LogitsProcessorSpec | None:
        """Logits processors to activate; anything but ``None`` is refused at start here."""
        return None


RawRequest = dict[str, Any]
RawResponseChunk = dict[str, Any]


class RawEngine(BaseEngine):
    """1.6.1's raw (non-token) media engine. Defined for imports; refused at start here."""

    @abstractmethod
    def generate(
        self, request: RawRequest, context: Context
    ) -> AsyncGenerator[RawResponseChunk, None]:
        """Yield response objects for one raw request."""


class DiffusionEngine(RawEngine):
    """1.6.1's diffusion-family ``RawEngine``. Refused at start here, like every raw engine."""


# -- logits-processor records (1.6.1's backend-neutral contract) --------------------------------
@dataclass(frozen=True)
class ForcedTokenSequenceSpec:
    """Force ``token_ids`` in order, then ``eos_token_id``."""

    token_ids: tuple[int, ...]
    eos_token_id: int


@dataclass(frozen=True)
class PythonProcessorSpec:
    """An in-process processor factory; never serialisable."""

    factory: Callable[[], Any]


LogitsProcessorEntry = ForcedTokenSequenceSpec | PythonProcessorSpec


@dataclass(frozen=True)
class LogitsProcessorSpec:
    """Processor entries; ``generation_only`` skips roles that emit no visible tokens."""

    entries: tuple[LogitsProcessorEntry, ...]
    generation_only: bool = True


_VISIBLE_STREAM_ROLES = frozenset({DisaggregationMode.AGGREGATED, DisaggregationMode.DECODE})
_FORCED = "forced_sequence"


def is_generation_stage(disaggregation_mode: DisaggregationMode) -> bool:
    """Whether a role's stream is what the client sees (aggregated and decode)."""
    return disaggregation_mode in _VISIBLE_STREAM_ROLES


def logits_processors_for_request(
    spec: LogitsProcessorSpec | None, *, disaggregation_mode: DisaggregationMode
) -> list[LogitsProcessorEntry]:
    """The entries one request on a worker of ``disaggregation_mode`` should apply."""
    if spec is None or (spec.generation_only and not is_generation_stage(disaggregation_mode)):
        return []
    return list(spec.entries)


def serialize_logits_processor_entries(
    entries: Sequence[LogitsProcessorEntry],
) -> list[dict[str, Any]]:
    """JSON-safe form; ``TypeError`` for an entry that cannot cross a process boundary."""
    out: list[dict[str, Any]] = []
    for entry in entries:
        if not isinstance(entry, ForcedTokenSequenceSpec):
            raise TypeError(
                f"{type(entry).__name__} cannot be serialized; only ForcedTokenSequenceSpec can"
            )
        out.append(
            {
                "kind": _FORCED,
                "token_ids": list(entry.token_ids),
                "eos_token_id": entry.eos_token_id,
            }
        )
    return out


def deserialize_logits_processor_entries(
    payload: Sequence[dict[str, Any]],
) -> list[LogitsProcessorEntry]:
    """Inverse of ``serialize_logits_processor_entries``; ``ValueError`` for an unknown kind."""
    entries: list[LogitsProcessorEntry] = []
    for item in payload:
        if item.get("kind") != _FORCED:
            raise ValueError(f"unknown logits-processor entry kind: {item.get('kind')!r}")
        entries.append(ForcedTokenSequenceSpec(tuple(item["token_ids"]), int(item["eos_token_id"])))
    return entries

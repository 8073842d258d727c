"""KV cache events as vLLM and SGLang publish them on their ZMQ PUB socket: the decoder.

Pure functions, no sockets: ``decode_batch(payload)`` turns the third frame of one ZMQ
message into an ``EventBatch``; ``relay`` receives the frames and republishes what
this returns. A payload that is not a batch at all raises ``MalformedBatch``; one bad event
inside a good batch becomes an ``EventIssue`` in its place and the other events survive.

The engines' wire format (vLLM ``vllm/distributed/kv_events.py``, SGLang
``sglang/srt/disaggregation/kv_events.py``; both encode with ``msgspec.msgpack``):

* ZMQ multipart message ``[topic, sequence (u64 big-endian), payload]``; ``sequence``
  counts batches from 0 per publisher process.
* payload: ``KVEventBatch``. ``EventBatch`` is ``array_like``: ``[ts, events]`` or
  ``[ts, events, data_parallel_rank]`` (vLLM adds the rank, SGLang does not). Newer vLLM
  trees encode it as a map ``{"ts", "events", "data_parallel_rank"}``; both are accepted.
* events are tagged (``tag=True``) msgspec structs, as a map whose first key is
  ``"type"`` (vLLM >= 0.10) or as an array whose first element is the tag (vLLM 0.9 and
  SGLang, ``array_like=True``). Fields, in order:

  - ``BlockStored``: ``block_hashes``, ``parent_block_hash``, ``token_ids``,
    ``block_size``, ``lora_id``, then (vLLM only) ``medium``, ``lora_name``, and
    optional ``extra_keys`` (ignored), ``group_idx``, ``kv_cache_spec_kind``,
    ``kv_cache_spec_sliding_window`` (ignored);
  - ``BlockRemoved``: ``block_hashes``, then (vLLM only) ``medium``, ``group_idx``;
  - ``AllBlocksCleared``: no fields.

  Fields with a default are omitted when they hold it (``omit_defaults``); ``lora_id``,
  ``medium`` and ``lora_name`` have none and are present even when null.
* block hashes are 64-bit integers, signed (SGLang uses Python's ``hash``) or unsigned;
  they are taken modulo 2**64, as Dynamo does. vLLM with
  ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`` sends the raw hash bytes instead; those become
  the integer of their last 8 bytes (big-endian), which is vLLM's own conversion.

``lora_id`` is deprecated in vLLM and, as in Dynamo, plays no part in routing;
``lora_name`` does (it seeds the router's block hash, see ``backend_common.kv_events.tokens_hash``).
Hybrid models (vLLM with several KV cache groups) tag events with ``group_idx``; stores also
carry the group's ``kv_cache_spec_kind``, which tells the main attention groups (the only
ones the router indexes, ``MAIN_ATTENTION_KINDS`` as in Dynamo) from the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from ...types import U64_MAX

__all__ = [
    "MAIN_ATTENTION_KINDS",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EventBatch",
    "EventIssue",
    "MalformedBatch",
    "decode_batch",
    "storage_tier",
]

# KV cache spec kinds whose blocks the router indexes (Dynamo's default index strategy).
MAIN_ATTENTION_KINDS = frozenset({"full_attention", "mla_attention", "sink_full_attention"})

# Field order of the array form (after the tag), as the structs declare them.
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id")
_STORED_FIELDS_VLLM = (*_STORED_FIELDS, "medium", "lora_name")
_REMOVED_FIELDS = ("block_hashes", "medium")

# The engines' storage medium names and Dynamo's storage tiers (``StorageTier``, snake case
# on the wire). An absent or unknown medium is the device, as in Dynamo.
_TIERS = {
    "GPU": "device",
    "DEVICE": "device",
    "CPU": "host_pinned",
    "CPU_PINNED": "host_pinned",
    "CPU_TIER1": "host_pinned",
    "CPU_TIER2": "disk",
    "DISK": "disk",
    "NVME": "disk",
    "EXTERNAL": "external",
    "NETWORK": "external",
    "REMOTE": "external",
    "SHARED": "external",
}


class MalformedBatch(ValueError):
    """The payload is not a KV event batch (not msgpack, wrong shape, wrong types)."""


@dataclass(frozen=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_name: str | None = None
    medium: str | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True)
class AllBlocksCleared:
    pass


@dataclass(frozen=True)
class EventIssue:
    """An event of a good batch that could not be decoded; ``reason`` is a metric label."""

    event_type: str  # the tag when there was one, else "unknown"
    reason: str  # "unknown_event_type" | "malformed_event"
    detail: str


Event = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True)
class EventBatch:
    ts: float
    data_parallel_rank: int | None
    events: list[Event | EventIssue]


def storage_tier(medium: str | None) -> str:
    """Dynamo's storage tier for an engine's ``medium`` (absent or unknown: ``device``)."""
    return _TIERS.get(medium.upper(), "device") if isinstance(medium, str) else "device"


def decode_batch(payload: bytes) -> EventBatch:
    """Decode one ``KVEventBatch`` payload. Raises ``MalformedBatch`` when it is none."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise MalformedBatch(f"payload is not msgpack: {exc}") from None
    if isinstance(obj, list | tuple):
        if len(obj) < 2:
            raise MalformedBatch(f"batch array has {len(obj)} elements, expected 2 or 3")
        ts, events = obj[0], obj[1]
        rank = obj[2] if len(obj) > 2 else None
    elif isinstance(obj, dict):
        if "events" not in obj:
            raise MalformedBatch("batch map has no 'events'")
        ts, events = obj.get("ts", 0.0), obj["events"]
        rank = obj.get("data_parallel_rank", obj.get("dp_rank"))
    else:
        raise MalformedBatch(f"batch is a {type(obj).__name__}, expected an array or a map")
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        raise MalformedBatch(f"batch timestamp is a {type(ts).__name__}")
    if not isinstance(events, list):
        raise MalformedBatch(f"batch events is a {type(events).__name__}, expected an array")
    if rank is not None and not _is_int(rank):
        raise MalformedBatch(f"data_parallel_rank is a {type(rank).__name__}")
    return EventBatch(float(ts), rank, [_decode_event(e) for e in events])


# -- one event --------------------------------------------------------------------------
class _Bad(ValueError):
    pass


def _decode_event(raw: Any) -> Event | EventIssue:
    if isinstance(raw, dict):
        tag, fields = raw.get("type"), raw
    elif isinstance(raw, list) and raw:
        tag, fields = raw[0], None
    else:
        return EventIssue("unknown", "malformed_event", f"event is a {type(raw).__name__}")
    if not isinstance(tag, str):
        return EventIssue("unknown", "malformed_event", "event has no type tag")
    try:
        if tag == "BlockStored":
            f = fields if fields is not None else _positional(raw, _STORED_FIELDS_VLLM)
            return _stored(f)
        if tag == "BlockRemoved":
            f = fields if fields is not None else _positional(raw, _REMOVED_FIELDS)
            return BlockRemoved(
                _hashes(_required(f, "block_hashes")), _opt_str(f, "medium"), _group(f)
            )
        if tag == "AllBlocksCleared":
            return AllBlocksCleared()
    except _Bad as exc:
        return EventIssue(tag, "malformed_event", str(exc))
    # Not the tag as the label: an engine must not be able to mint metric series.
    return EventIssue("unknown", "unknown_event_type", f"unknown KV event type {tag[:64]!r}")


def _positional(raw: list[Any], names: Sequence[str]) -> dict[str, Any]:
    # Missing trailing fields were omitted as defaults; extra trailing ones are newer fields.
    return dict(zip(names, raw[1:], strict=False))


def _stored(f: dict[str, Any]) -> BlockStored:
    block_size = _required(f, "block_size")
    if not _is_int(block_size) or block_size <= 0:
        raise _Bad(f"block_size must be a positive integer, got {block_size!r}")
    tokens = _required(f, "token_ids")
    if not isinstance(tokens, list) or not all(_is_int(t) and t >= 0 for t in tokens):
        raise _Bad("token_ids must be an array of non-negative integers")
    parent = f.get("parent_block_hash")
    lora_name = _opt_str(f, "lora_name")
    return BlockStored(
        block_hashes=_hashes(_required(f, "block_hashes")),
        parent_block_hash=None if parent is None else _hash(parent),
        token_ids=tokens,
        block_size=block_size,
        lora_name=lora_name or None,
        medium=_opt_str(f, "medium"),
        group_idx=_group(f),
        kv_cache_spec_kind=_opt_str(f, "kv_cache_spec_kind"),
    )


def _group(f: dict[str, Any]) -> int | None:
    value = f.get("group_idx")
    if value is not None and not (_is_int(value) and value >= 0):
        raise _Bad(f"group_idx must be a non-negative integer or null, got {value!r}")
    return value


def _required(f: dict[str, Any], name: str) -> Any:
    if name not in f:
        raise _Bad(f"missing field {name!r}")
    return f[name]


def _opt_str(f: dict[str, Any], name: str) -> str | None:
    value = f.get(name)
    if value is not None and not isinstance(value, str):
        raise _Bad(f"{name} must be a string or null, got {type(value).__name__}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hash(value: Any) -> int:
    if _is_int(value):
        return value & U64_MAX
    if isinstance(value, bytes) and value:
        return int.from_bytes(value[-8:], "big")
    raise _Bad(f"a block hash must be an integer or bytes, got {type(value).__name__}")


def _hashes(value: Any) -> list[int]:
    if not isinstance(value, list):
        raise _Bad(f"block_hashes must be an array, got {type(value).__name__}")
    return [_hash(v) for v in value]

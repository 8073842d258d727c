"""``dynamo.llm`` for 1.6.1-style engines: ``KvEventPublisher`` (and ``ModelInput``).

A 1.6.1 engine receives its ``KvEventPublisher`` through ``PushSource.on_ready``; here that
publisher is a thin view over the worker's own ``backend_common.kv_events.KvEventPublisher``,
so events go out on the worker's event plane (ZMQ or NATS) in Dynamo's wire format. It takes
1.6.1's call shapes: ``publish_stored(token_ids, num_block_tokens, block_hashes,
parent_hash=None, block_mm_infos=None, lora_name=None, is_eagle=None, cache_salt=None)`` and
``publish_removed(block_hashes)``. Options this runtime cannot hash the way the router
expects (multimodal block infos, EAGLE windows, a cache salt) raise ``InvalidArgument``
instead of publishing hashes the router would never match. Thread-safe, like the view's
target. It cannot be built from an ``Endpoint`` as 1.6.1's can: there are no endpoints here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import invalid_arg
from ..kv_events import KvEventPublisher as _NativeKvEventPublisher
from .core import ModelInput

__all__ = ["KvEventPublisher", "ModelInput"]


class KvEventPublisher:
    __slots__ = ("_native",)

    def __init__(self, publisher: _NativeKvEventPublisher) -> None:
        if not isinstance(publisher, _NativeKvEventPublisher):
            raise TypeError(
                "KvEventPublisher is handed to the engine by the worker (PushSource.on_ready); "
                "it cannot be built from an Endpoint on this runtime"
            )
        self._native = publisher

    @property
    def dp_rank(self) -> int:
        return self._native.dp_rank

    def publish_stored(
        self,
        token_ids: Sequence[int],
        num_block_tokens: Sequence[int],
        block_hashes: Sequence[int],
        parent_hash: int | None = None,
        block_mm_infos: Sequence[dict[str, Any] | None] | None = None,
        lora_name: str | None = None,
        is_eagle: bool | None = None,
        cache_salt: str | None = None,
    ) -> None:
        if block_mm_infos is not None and any(info is not None for info in block_mm_infos):
            raise invalid_arg("KvEventPublisher: block_mm_infos is not supported on this runtime")
        if is_eagle:
            raise invalid_arg("KvEventPublisher: is_eagle is not supported on this runtime")
        if cache_salt is not None:
            raise invalid_arg("KvEventPublisher: cache_salt is not supported on this runtime")
        self._native.publish_stored(
            list(token_ids),
            list(num_block_tokens),
            list(block_hashes),
            parent_hash,
            lora_name=lora_name,
        )

    def publish_removed(self, block_hashes: Sequence[int]) -> None:
        self._native.publish_removed(list(block_hashes))

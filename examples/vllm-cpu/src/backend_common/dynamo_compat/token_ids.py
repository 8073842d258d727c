"""``dynamo.common.utils.token_ids``: accept ``token_ids`` as a list or as packed int32 bytes.

A 1.6.1 engine calls ``normalize_request_token_ids(request)`` first thing in ``generate``.
Our request plane always delivers a list (``PreprocessedRequest`` validates it), so on this
runtime the call is a no-op; it still unpacks a little-endian int32 buffer, or anything with
``tolist()``, as 1.6.1's does, so an engine's own tests behave the same.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TypeVar, cast

__all__ = ["normalize_request_token_ids", "token_ids_len", "token_ids_to_list"]

_RequestT = TypeVar("_RequestT", bound=Mapping[str, Any])


def token_ids_to_list(value: Any) -> list[int] | None:
    """``value`` as a list of ints; ``None`` stays ``None``. Bytes are packed LE int32."""
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        raw = memoryview(value).cast("B")
        if raw.nbytes % 4:
            raise ValueError(f"packed token_ids byte length {raw.nbytes} is not a multiple of 4")
        ids = array.array("i")
        ids.frombytes(raw.tobytes())
        if sys.byteorder != "little":
            ids.byteswap()
        return ids.tolist()
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return list(tolist())
    return list(value)


def token_ids_len(value: Any) -> int:
    """Number of token ids in ``value`` (a list, or packed int32 bytes) without unpacking."""
    if value is None:
        return 0
    if isinstance(value, bytes | bytearray | memoryview):
        return memoryview(value).nbytes // 4
    return len(value)


def normalize_request_token_ids(request: _RequestT) -> _RequestT:
    """Replace a non-list ``request["token_ids"]`` by its list, in place; return ``request``."""
    ids = request.get("token_ids")
    if ids is not None and not isinstance(ids, list):
        cast(MutableMapping[str, Any], request)["token_ids"] = token_ids_to_list(ids)
    return request

"""backend_common: a pure-Python runtime for custom NVIDIA Dynamo 1.6.x backends.

The Python counterpart of Dynamo's ``dynamo-backend-common`` crate. An engine
implements ``LLMEngine``; ``run(EngineCls)`` turns it into a worker that the
real ``python -m dynamo.frontend`` discovers and routes OpenAI traffic to.

Engine code imports from here only: the contract (``LLMEngine``,
``EngineConfig``, ``WorkerConfig``, ``PreprocessedRequest``,
``LLMEngineOutput``, ``FinishReason``, ``GenerateContext``, ``chunk``,
``usage``), ``RequestGuard`` and ``ActiveRequests``, ``ThreadFeed`` (results from an
engine's own compute thread to a request's stream, see ``threaded``), ``errors``,
``request_policy`` (the checks the worker runs before ``generate``) and ``testing``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import DisaggregationMode, EngineConfig, WorkerConfig
from .context import GenerateContext
from .engine import LLMEngine
from .errors import BackendError, DynamoError, ErrorType
from .guard import ActiveRequests, RequestGuard
from .threaded import ThreadFeed
from .types import (
    FinishReason,
    LLMEngineOutput,
    PreprocessedRequest,
    chunk,
    usage,
)

if TYPE_CHECKING:
    from .runtime.runner import run

__version__ = "0.1.0"

__all__ = [
    "ActiveRequests",
    "BackendError",
    "DisaggregationMode",
    "DynamoError",
    "EngineConfig",
    "ErrorType",
    "FinishReason",
    "GenerateContext",
    "LLMEngine",
    "LLMEngineOutput",
    "PreprocessedRequest",
    "RequestGuard",
    "ThreadFeed",
    "WorkerConfig",
    "chunk",
    "run",
    "usage",
]


def __getattr__(name: str) -> Any:
    # `run` pulls in the whole worker (discovery, transports, HTTP); engine code and
    # the conformance kit should not pay for that import, so it is loaded on first use.
    if name == "run":
        from .runtime.runner import run

        return run
    raise AttributeError(f"module 'backend_common' has no attribute {name!r}")

"""Run engines written for Dynamo 1.6.1's Python backend interface on ``backend_common``.

An engine written against ``dynamo.common.backend`` (1.6.1) changes one import::

    from backend_common.dynamo_compat import EngineConfig, LLMEngine, WorkerConfig, run

and keeps its code: dict requests and chunks, ``from_args`` returning ``(engine,
WorkerConfig)``, ``EngineConfig`` with an ``LlmRegistration``, ``is_quiescent``, the
``Context`` calls, the KV event descriptors. ``run(EngineCls)`` serves it with this runtime's
worker through ``adapter.DynamoEngineAdapter``; ``aliases`` makes the unmodified source
import (its ``dynamo.*`` names resolve here) and ``launch`` runs such an engine from the
command line. What maps to what, and what does not: docs/dynamo-compat.md.

The names of 1.6.1's ``dynamo.common.backend`` package are exported here, plus ``Context``,
``DisaggregationMode``, ``ZmqSource`` / ``PushSource`` / ``ComponentSnapshot`` and ``run``;
the submodules carry 1.6.1's helpers under 1.6.1's module names. Importing the package
does not import the worker: ``run`` does, when called.
"""

from __future__ import annotations

from . import telemetry
from .constants import DisaggregationMode
from .core import Context
from .engine import (
    BaseEngine,
    DiffusionEngine,
    EngineConfig,
    GenerateChunk,
    GenerateRequest,
    LLMEngine,
    LlmRegistration,
    RawEngine,
    RawRequest,
    RawResponseChunk,
)
from .launch import Worker, run
from .publisher import ComponentSnapshot, KvEventSource, PushSource, ZmqSource
from .worker import WorkerConfig

__all__ = [
    "BaseEngine",
    "ComponentSnapshot",
    "Context",
    "DiffusionEngine",
    "DisaggregationMode",
    "EngineConfig",
    "GenerateChunk",
    "GenerateRequest",
    "KvEventSource",
    "LLMEngine",
    "LlmRegistration",
    "PushSource",
    "RawEngine",
    "RawRequest",
    "RawResponseChunk",
    "Worker",
    "WorkerConfig",
    "ZmqSource",
    "run",
    "telemetry",
]

"""``dynamo.common.constants`` for 1.6.1-style engines: ``DisaggregationMode``.

The compatibility layer's enum is ``backend_common``'s own (same members, same values:
``agg``, ``prefill``, ``decode``, ``encode``), so a mode parsed by a 1.6.1 engine's
``from_args`` needs no translation on its way to the worker.
"""

from __future__ import annotations

from ..config import DisaggregationMode

__all__ = ["DisaggregationMode"]

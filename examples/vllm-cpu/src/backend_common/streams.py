"""Closing an engine's output stream, the one way every consumer of ``generate`` does it.

``generate`` may return an async generator (its ``finally`` blocks run on ``aclose()``) or
any other async iterator (nothing to close). Callers (the worker's adapter and health canary,
the tracing span, the stream-rule checker, the conformance kit) call ``close_stream`` in
their own ``finally`` once they stop iterating, so the engine's cleanup runs at that moment
rather than whenever the generator is garbage collected.
"""

from __future__ import annotations

from typing import Any

__all__ = ["close_stream"]


async def close_stream(stream: Any) -> None:
    """Await ``stream.aclose()`` when the stream has one; exceptions propagate."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()

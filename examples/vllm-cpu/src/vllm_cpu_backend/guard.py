"""``ActiveRequests``: the engine's in-flight requests and the release of what each holds.

``generate`` wraps its body in ``with self.active.track(ctx, release):``. The returned
``backend_common.RequestGuard`` calls ``release`` exactly once on every exit path of the
stream (finished, raised, cancelled, closed early by the consumer with ``aclose()``, or
garbage collected without being closed) and forgets the request. ``cleanup`` calls
``stop_all()`` so every open stream ends with a clean cancelled terminal rather than an
error when the engine goes away.

Single event loop: all methods are called from the loop's thread, no locking needed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from backend_common import GenerateContext, RequestGuard

__all__ = ["ActiveRequests"]


class ActiveRequests:
    def __init__(self) -> None:
        # Keyed by a private counter, not by request id: ids come from the network and two
        # in-flight requests with the same id must still be tracked (and released) separately.
        self._keys = itertools.count()
        self._active: dict[int, GenerateContext] = {}

    def track(
        self, ctx: GenerateContext, release: Callable[[], object] | None = None
    ) -> RequestGuard:
        """Register ``ctx`` as active; the guard forgets it and calls ``release`` once."""
        key = next(self._keys)
        self._active[key] = ctx

        def _release() -> None:
            self._active.pop(key, None)
            if release is not None:
                release()

        return RequestGuard(_release)

    def __len__(self) -> int:
        return len(self._active)

    def request_ids(self) -> list[str]:
        return [ctx.id() for ctx in self._active.values()]

    def stop_all(self) -> int:
        """Ask every active stream to stop (each then yields a cancelled terminal)."""
        contexts = list(self._active.values())
        for ctx in contexts:
            ctx.stop_generating()
        return len(contexts)

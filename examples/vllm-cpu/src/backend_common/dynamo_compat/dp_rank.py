"""``dynamo.common.backend.dp_rank``: read and check the router's data-parallel rank.

``forced_dp_rank(request)`` is ``request["routing"]["dp_rank"]`` as an int, or ``None``.
``validate_global_dp_rank(rank, start, size, label)`` returns ``rank`` when this worker hosts
it (``start <= rank < start + size``) and more than one rank exists; otherwise ``None``,
logging a warning for a rank out of range (the engine then picks a rank itself).
"""

from __future__ import annotations

import logging

from .engine import GenerateRequest

__all__ = ["forced_dp_rank", "validate_global_dp_rank"]

log = logging.getLogger(__name__)


def forced_dp_rank(request: GenerateRequest) -> int | None:
    rank = (request.get("routing") or {}).get("dp_rank")
    return None if rank is None else int(rank)


def validate_global_dp_rank(
    dp_rank: int | None, dp_start: int, dp_size: int, backend_label: str
) -> int | None:
    if dp_rank is None or dp_size <= 1:
        return None
    if dp_start <= dp_rank < dp_start + dp_size:
        return dp_rank
    log.warning(
        "DP rank %d is outside [%d, %d); %s picks the rank itself",
        dp_rank,
        dp_start,
        dp_start + dp_size,
        backend_label,
    )
    return None

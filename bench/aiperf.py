"""The aiperf cross-check of the benchmark (aiperf itself: ``backend_common.devstack.aiperf``).

``DEFAULT_VENV`` is where ``make bench`` installs aiperf on first use (``.venv-aiperf`` at the
repository root, never by ``make install``); the benchmark passes ``bench.load.PROMPT``'s
length as the prompt size, so aiperf's requests have the load generator's shape.
``compare(ours, theirs)`` puts a level of ``bench.load`` next to aiperf's
figures for it: ``ours / aiperf`` for tok/s and TTFT p50, and whether each agrees within
``AGREEMENT`` (10 %).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backend_common.devstack.aiperf import (
    AIPERF_VERSION,
    AiperfError,
    aiperf_command,
    ensure_aiperf,
    run_aiperf,
    summarize,
)

__all__ = [
    "AGREEMENT",
    "AIPERF_VERSION",
    "DEFAULT_VENV",
    "AiperfError",
    "aiperf_command",
    "compare",
    "ensure_aiperf",
    "run_aiperf",
    "summarize",
]

AGREEMENT = 0.10
DEFAULT_VENV = Path(__file__).resolve().parent.parent / ".venv-aiperf"


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return float(a) / float(b)
    return None


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """``bench.load``'s level summary against aiperf's at the same level."""
    out: dict[str, Any] = {}
    for metric in ("output_tokens_per_s", "ttft_ms_p50"):
        ratio = _ratio(ours.get(metric), theirs.get(metric))
        out[metric] = {
            "ours": ours.get(metric),
            "aiperf": theirs.get(metric),
            "ratio": ratio,
            "agree": None if ratio is None else abs(ratio - 1.0) <= AGREEMENT,
        }
    return out

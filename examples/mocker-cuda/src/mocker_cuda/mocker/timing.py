"""How long a simulated forward pass takes: Dynamo's polynomial perf model.

The scheduler calls ``TimingModel.step_seconds`` once per forward pass with
what that pass computed, and sleeps that long (minus the time the device
workload already took). Formulas (contract section 10.3, the mocker's default
``{"type": "polynomial"}`` model):

* prefill ms = 4.209989e-07·T² + 1.518344e-02·T + 16.50142, where ``T`` is the
  number of new (not prefix-cached) prompt tokens computed in the pass; 0 when
  ``T == 0``; floored at 0.
* decode ms = -25.74·u² + 54.01·u + 5.74, where ``u`` is the KV-cache
  utilisation (active KV tokens / total KV tokens, 1 when the pool is empty);
  floored at 1 ms; only charged when the pass decodes at least one sequence.

A pass that both prefills and decodes costs the sum. Wall time is the
prediction divided by ``speedup_ratio``; ``speedup_ratio == 0`` means no delay
at all (infinite speed-up), as in Dynamo's mocker.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DECODE_COEFFS", "PREFILL_COEFFS", "TimingModel", "decode_ms", "prefill_ms"]

# (a, b, c) of a·x² + b·x + c.
PREFILL_COEFFS = (4.209989e-07, 1.518344e-02, 16.50142)
DECODE_COEFFS = (-25.74, 54.01, 5.74)
DECODE_FLOOR_MS = 1.0


def prefill_ms(new_tokens: int) -> float:
    """Predicted prefill time for ``new_tokens`` uncached prompt tokens in one pass."""
    if new_tokens <= 0:
        return 0.0
    a, b, c = PREFILL_COEFFS
    t = float(new_tokens)
    return max(0.0, a * t * t + b * t + c)


def decode_ms(kv_utilisation: float) -> float:
    """Predicted decode time of one pass at KV utilisation ``kv_utilisation`` (0..1)."""
    u = min(max(kv_utilisation, 0.0), 1.0)
    a, b, c = DECODE_COEFFS
    return max(DECODE_FLOOR_MS, a * u * u + b * u + c)


@dataclass(frozen=True)
class TimingModel:
    """Turns a pass's work into wall-clock seconds. ``speedup_ratio`` 0 = no delay."""

    speedup_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.speedup_ratio < 0:
            raise ValueError(f"speedup_ratio must be >= 0, got {self.speedup_ratio}")

    def predicted_ms(self, prefill_tokens: int, decode_seqs: int, kv_utilisation: float) -> float:
        """The perf model's prediction for one pass, before the speed-up."""
        total = prefill_ms(prefill_tokens)
        if decode_seqs > 0:
            total += decode_ms(kv_utilisation)
        return total

    def step_seconds(self, prefill_tokens: int, decode_seqs: int, kv_utilisation: float) -> float:
        """Wall-clock seconds the pass should take."""
        if self.speedup_ratio == 0:
            return 0.0
        ms = self.predicted_ms(prefill_tokens, decode_seqs, kv_utilisation)
        return ms / self.speedup_ratio / 1000.0

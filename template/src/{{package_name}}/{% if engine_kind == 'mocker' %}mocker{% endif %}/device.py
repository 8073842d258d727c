"""The device workload: real PyTorch work per simulated forward pass.

The timing model decides how long a pass *should* take; this module makes the
pass touch the accelerator for real, so a mocker worker exercises the GPU
driver, memory and kernel launch path of the machine it runs on. Each pass
runs ``x[:tokens] @ w`` with ``x: [max_rows, hidden]`` and ``w: [hidden, hidden]``
(both allocated once, at construction, on the device), sized by the number of
tokens the pass computed (capped at ``max_rows``).

Timing: on CUDA a pair of ``torch.cuda.Event(enable_timing=True)`` brackets the
matmul and ``elapsed_time`` gives the kernel time; on CPU ``perf_counter``.

Device choice: ``"cuda"`` needs ``torch.cuda.is_available()``; otherwise the
workload falls back to ``"cpu"`` and logs a warning saying so. ``"none"`` (or
torch not installed, with a warning) disables the workload: passes cost
only the timing model's sleep.

On the CPU torch is limited to one intra-op thread (``torch.set_num_threads(1)``,
in every thread that runs a pass): the matmuls are small, and torch's default
OpenMP pool spin-waits on every core, starving the event loop and everything
else on the machine (measured: a 64x64x64 matmul took 15 ms instead of 7 us on
a loaded 2-core host). The CPU *fallback*
(cuda asked for, no GPU) also shrinks the workload to at most
``CPU_FALLBACK_HIDDEN`` wide and ``CPU_FALLBACK_ROWS`` rows: it stays real work
per pass, but a stand-in must not cost more than the simulation it accompanies.
An explicit ``--device cpu`` keeps the sizes it was given.

Who calls what: the scheduler calls ``run(tokens)`` once per pass, calls never
overlap. It calls it inline on the event loop when ``inline(tokens)`` says the
pass is tiny (a thread hop would cost more than the matmul), else from a worker
thread (``asyncio.to_thread``) so the event loop keeps serving streams; CUDA
passes always go to the thread (the event synchronisation blocks). ``stats()``
may be called any time from the loop thread.
torch is imported here only, lazily, so the rest of the mocker (and its
tests of scheduling) never pays for it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = ["DeviceStats", "DeviceWorkload", "percentile"]

log = logging.getLogger(__name__)

# Step times kept for percentiles: bounded so a long-running worker does not grow.
STEP_HISTORY = 100_000
# The CPU fallback's workload size (see the module docstring).
CPU_FALLBACK_HIDDEN = 64
CPU_FALLBACK_ROWS = 64
# CPU passes up to this many multiply-adds (~tens of microseconds) run inline.
INLINE_MAX_MACS = 1 << 20


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class DeviceStats:
    device: str  # what actually ran: "cuda", "cpu" or "none"
    requested: str  # what was asked for
    steps: int
    events_recorded: int  # CUDA events recorded (0 off CUDA)
    tokens: int  # rows multiplied, summed over steps
    peak_memory_bytes: int  # torch.cuda.max_memory_allocated() on CUDA; tensor bytes on CPU
    step_ms: tuple[float, ...]  # most recent step times (bounded history)

    @property
    def p50_ms(self) -> float:
        return percentile(list(self.step_ms), 50)

    @property
    def p99_ms(self) -> float:
        return percentile(list(self.step_ms), 99)

    @property
    def last_ms(self) -> float:
        return self.step_ms[-1] if self.step_ms else 0.0


class DeviceWorkload:
    def __init__(
        self,
        device: str = "cpu",
        *,
        hidden_size: int = 256,
        max_rows: int = 8192,
        seed: int = 0,
    ) -> None:
        if hidden_size <= 0 or max_rows <= 0:
            raise ValueError("hidden_size and max_rows must be positive")
        self.requested = device
        self.hidden_size = hidden_size
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._steps = 0
        self._events = 0
        self._tokens = 0
        self._step_ms: deque[float] = deque(maxlen=STEP_HISTORY)
        self._torch: Any = None
        self._x: Any = None
        self._w: Any = None
        self._closed = False
        self._final_peak = 0
        self._one_thread: set[int] = set()  # threads whose torch runs on one intra-op thread
        self.device = self._resolve(device)
        torch: Any = self._torch  # set by _resolve (None for "none")
        if self.device == "cpu":
            torch.set_num_threads(1)
            if (device or "").strip().lower().startswith("cuda"):  # the fallback
                self.hidden_size = hidden_size = min(hidden_size, CPU_FALLBACK_HIDDEN)
                self.max_rows = max_rows = min(max_rows, CPU_FALLBACK_ROWS)
        if self.device != "none":
            gen = torch.Generator(device="cpu").manual_seed(seed)
            x = torch.randn(max_rows, hidden_size, generator=gen)
            w = torch.randn(hidden_size, hidden_size, generator=gen) / math.sqrt(hidden_size)
            self._x = x.to(self.device)
            self._w = w.to(self.device)
        log.info(
            "mocker device workload on %s (requested %s, hidden %d, max rows %d)",
            self.device,
            device,
            self.hidden_size,
            self.max_rows,
        )

    def _resolve(self, device: str) -> str:
        device = (device or "cpu").strip().lower()
        if device == "none":
            return "none"
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"unknown device '{device}' (expected cpu, cuda, cuda:N or none)")
        try:
            with warnings.catch_warnings():
                # CPU-only torch wheels warn when numpy is absent; the workload never uses numpy.
                warnings.filterwarnings("ignore", message=".*NumPy.*")
                import torch
        except ImportError:
            log.warning(
                "mocker: --device %s asked for, but torch is not installed; "
                "running without a device workload (timing model only)",
                device,
            )
            return "none"
        self._torch = torch
        if device.startswith("cuda") and not torch.cuda.is_available():
            log.warning(
                "mocker: --device %s asked for, but no CUDA GPU is available "
                "(torch.cuda.is_available() is False); falling back to cpu "
                "(one thread, at most %d x %d)",
                device,
                CPU_FALLBACK_ROWS,
                CPU_FALLBACK_HIDDEN,
            )
            return "cpu"
        return device

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def inline(self, tokens: int) -> bool:
        """Whether a pass of ``tokens`` rows is cheap enough to run on the event loop."""
        if self.device != "cpu":
            return self.device == "none"
        return min(tokens, self.max_rows) * self.hidden_size * self.hidden_size <= INLINE_MAX_MACS

    def run(self, tokens: int) -> float:
        """Run one pass's workload for ``tokens`` rows; returns its time in ms."""
        if self.device == "none" or tokens <= 0:
            return 0.0
        rows = min(tokens, self.max_rows)
        torch = self._torch
        with self._lock, torch.no_grad():
            if self._closed:
                return 0.0
            if self.is_cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                y = self._x[:rows] @ self._w
                end.record()
                end.synchronize()
                ms = float(start.elapsed_time(end))
                events = 2
            else:
                if threading.get_ident() not in self._one_thread:
                    # OpenMP's thread count is per calling thread: set it in each thread that
                    # runs a pass (the loop's, the executor's), not only where torch was loaded.
                    torch.set_num_threads(1)
                    self._one_thread.add(threading.get_ident())
                t0 = time.perf_counter()
                y = self._x[:rows] @ self._w
                ms = (time.perf_counter() - t0) * 1000.0
                events = 0
            del y
            self._steps += 1
            self._events += events
            self._tokens += rows
            self._step_ms.append(ms)
        return ms

    @property
    def steps(self) -> int:
        return self._steps

    @property
    def last_ms(self) -> float:
        return self._step_ms[-1] if self._step_ms else 0.0

    def peak_memory_bytes(self) -> int:
        if self.device == "none":
            return 0
        if self._closed:
            return self._final_peak
        if self.is_cuda:
            return int(self._torch.cuda.max_memory_allocated(self._x.device))
        # CPU: the resident working set of the workload (inputs plus one output).
        elem = self._x.element_size()
        return int((self._x.numel() + self._w.numel() + self.max_rows * self.hidden_size) * elem)

    def stats(self) -> DeviceStats:
        with self._lock:
            return DeviceStats(
                device=self.device,
                requested=self.requested,
                steps=self._steps,
                events_recorded=self._events,
                tokens=self._tokens,
                peak_memory_bytes=self.peak_memory_bytes(),
                step_ms=tuple(self._step_ms),
            )

    def close(self) -> None:
        """Drop the device tensors (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._final_peak = self.peak_memory_bytes()
            self._closed = True
            self._x = None
            self._w = None

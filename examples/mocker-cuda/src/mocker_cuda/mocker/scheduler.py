"""The continuous-batching scheduler: one asyncio task runs every forward pass.

Shape (vLLM's, as Dynamo's mocker simulates it):

* ``waiting`` (FIFO deque) and ``running`` (admission order) queues.
* Each pass has a token budget (``max_num_batched_tokens``) and a sequence cap
  (``max_num_seqs``). Running sequences are served first: one token each when
  decoding, the rest of their prompt when prefilling (in budget-sized chunks
  when chunked prefill is on). Then waiting sequences are admitted in order,
  after a prefix-cache lookup, while budget, seats and KV blocks last; a new
  admission must leave ``watermark × num_blocks`` blocks free unless nothing
  else is running.
* When a running sequence cannot get a KV block, the most recently admitted
  running sequence is preempted (LIFO): its blocks are freed, its computed
  count reset, and it goes back to the head of ``waiting`` to be recomputed
  (prompt plus what it generated so far). Nothing is admitted in a pass that
  preempted.
* A sequence whose tokens are all computed after the pass samples one token:
  a draw in ``[1000, 2000)`` from its own PRNG, seeded from ``--seed``, the
  prompt and the request's sampling seed. Output depends only on those, never
  on batching or preemption. Stop checks, in order: EOS (unless
  ``ignore_eos``) and ``stop_token_ids``, both only once ``min_tokens`` were
  generated; then ``max_tokens``.
* Every sampled token goes to the sequence's ``TokenChannel`` (``channel.py``),
  with ``finish`` set on the last one; a finished sequence frees its blocks in
  the same pass.
* Pacing (``start``): a pass is due ``TimingModel.step_seconds`` after the
  previous one was due (a simulated clock). The loop sleeps only while it is
  ahead of that clock by more than ``MIN_SLEEP_S``. When it is behind (a huge
  speed-up ratio, or ratio 0: Python cannot run a pass in the 6 us a decode
  pass lasts at ratio 1000) it runs passes back to back and yields to the
  event loop (``sleep(0)``) once it has run ``BUSY_PASSES`` passes and at
  least ``BUSY_SLICE_S`` of work since the last yield (at most ``MAX_LAG_S``):
  each stream then finds the tokens of several passes ready and relays them
  in one loop turn (one wake-up and one write to the frontend instead of one
  per token), and new requests are still accepted within a slice. Counting
  passes keeps the tokens per wake-up the same at every batch size: with a
  time slice alone, a batch whose pass outlasts the slice (hundreds of
  running sequences) would wake every stream once per token, and the cost of
  a token would grow with the number of open streams. It never accumulates
  more than ``MAX_LAG_S`` of debt.
* The device workload runs inline when it is tiny (``DeviceWorkload.inline``),
  else in a worker thread so the loop keeps serving streams meanwhile.

Who calls what, all on the event loop's thread: the engine calls ``add`` once
per request (it returns the channel), ``remove`` from the request's guard on
every exit path (idempotent: frees the blocks of a cancelled, dropped or
finished request), ``start`` once and ``stop`` at cleanup (every remaining
channel is then closed). Tests drive passes synchronously with
``step()`` instead of ``start``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import time
from collections import deque
from dataclasses import dataclass, field

from backend_common.types import FinishReason
from blake3 import blake3

from .channel import TokenChannel
from .device import DeviceWorkload
from .kv_cache import KvCache
from .timing import TimingModel

__all__ = [
    "Scheduler",
    "SchedulerConfig",
    "Sequence",
    "StepPlan",
    "TOKEN_ID_RANGE",
    "request_rng",
]

log = logging.getLogger(__name__)

TOKEN_ID_RANGE = (1000, 2000)  # like Dynamo's mocker: ids that no special token uses
# Pacing: sleeping less than this is not worth a timer (the loop just yields instead) ...
MIN_SLEEP_S = 1e-4
# ... and a loop that fell behind its simulated clock never owes more than this.
MAX_LAG_S = 0.005
# A loop that is behind runs passes back to back for at least this long, and at least this
# many passes, before it yields (never longer than MAX_LAG_S; see the module docstring).
BUSY_SLICE_S = 0.0005
BUSY_PASSES = 4

# Where a sequence is: the scheduler's queues, or gone (finished, removed, preempted-and-removed).
WAITING, RUNNING, GONE = 0, 1, 2


@dataclass(frozen=True)
class SchedulerConfig:
    num_blocks: int = 16384
    block_size: int = 64
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    watermark: float = 0.01

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")


def request_rng(seed: int, prompt: list[int], sampling_seed: int | None = None) -> random.Random:
    """The per-request PRNG: a function of ``--seed``, the prompt and the sampling seed only."""
    h = blake3(struct.pack("<qq", seed, -1 if sampling_seed is None else sampling_seed))
    h.update(struct.pack(f"<{len(prompt)}I", *(t & 0xFFFFFFFF for t in prompt)))
    return random.Random(int.from_bytes(h.digest(8), "little"))


@dataclass(eq=False)
class Sequence:
    """A request's scheduling state. Build with ``Sequence.new``; owned by the scheduler."""

    request_id: str
    prompt_len: int
    tokens: list[int]  # prompt + generated
    max_tokens: int
    min_tokens: int
    ignore_eos: bool
    eos_token_ids: frozenset[int]
    stop_token_ids: frozenset[int]
    rng: random.Random
    kv_transferred: bool = False  # decode role: the prompt's KV arrived from a peer
    kv_transfer_pending: bool = False  # ... and is not yet placed in this worker's blocks
    generated: int = 0
    num_computed: int = 0
    cached_tokens: int = 0  # prefix-cache hit of the latest admission
    preemptions: int = 0
    state: int = WAITING  # WAITING, RUNNING or GONE; kept by the scheduler
    channel: TokenChannel = field(default_factory=TokenChannel)

    @classmethod
    def new(
        cls,
        request_id: str,
        prompt: list[int],
        *,
        max_tokens: int,
        seed: int = 0,
        min_tokens: int = 0,
        ignore_eos: bool = False,
        eos_token_ids: list[int] | None = None,
        stop_token_ids: list[int] | None = None,
        sampling_seed: int | None = None,
        kv_transferred: bool = False,
    ) -> Sequence:
        if not prompt:
            raise ValueError("token_ids must not be empty")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        return cls(
            request_id=request_id,
            prompt_len=len(prompt),
            tokens=list(prompt),
            max_tokens=max_tokens,
            min_tokens=max(0, min_tokens),
            ignore_eos=ignore_eos,
            eos_token_ids=frozenset(eos_token_ids or ()),
            stop_token_ids=frozenset(stop_token_ids or ()),
            rng=request_rng(seed, prompt, sampling_seed),
            kv_transferred=kv_transferred,
            kv_transfer_pending=kv_transferred,
        )

    @property
    def decoding(self) -> bool:
        """Only the newest token is left to compute (not a prefill, nor a recompute)."""
        return self.num_computed == len(self.tokens) - 1 and (
            self.generated > 0 or self.kv_transferred
        )


@dataclass
class StepPlan:
    """What one forward pass computes: ``(sequence, new tokens)`` pairs."""

    scheduled: list[tuple[Sequence, int]]
    prefill_tokens: int
    decode_seqs: int
    preempted: list[str]
    kv_utilisation: float

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        *,
        timing: TimingModel | None = None,
        device: DeviceWorkload | None = None,
        seed: int = 0,
    ) -> None:
        self.config = config
        self.seed = seed
        self.kv = KvCache(
            config.num_blocks,
            config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.timing = timing or TimingModel(0.0)
        self.device = device
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._seqs: dict[str, Sequence] = {}
        self._watermark_blocks = int(config.watermark * config.num_blocks)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.steps = 0
        self.preemptions = 0
        self.prefill_tokens = 0  # prompt (and recompute) tokens computed, all passes
        self.decode_tokens = 0
        self.last_step_ms = 0.0

    # -- limits -------------------------------------------------------------------
    @property
    def max_sequence_tokens(self) -> int:
        """The longest sequence (prompt + output) this pool can ever hold and schedule."""
        limit = self.config.num_blocks * self.config.block_size
        if not self.config.enable_chunked_prefill:
            # A preempted sequence is recomputed in one pass: it must fit one budget.
            limit = min(limit, self.config.max_num_batched_tokens)
        return limit

    # -- requests -------------------------------------------------------------------
    def add(self, seq: Sequence) -> TokenChannel:
        """Queue ``seq``; returns its channel. Raises ValueError if it can never run."""
        if self._closed:
            raise RuntimeError("scheduler is not accepting requests")
        if seq.request_id in self._seqs:
            raise ValueError(f"request id '{seq.request_id}' is already scheduled")
        needed = seq.prompt_len + seq.max_tokens - 1
        if needed > self.max_sequence_tokens:
            raise ValueError(
                f"prompt ({seq.prompt_len} tokens) plus max_tokens ({seq.max_tokens}) needs "
                f"{needed} tokens of KV cache; this worker holds at most "
                f"{self.max_sequence_tokens} per sequence"
            )
        self._seqs[seq.request_id] = seq
        seq.state = WAITING
        self.waiting.append(seq)
        self._wake.set()
        return seq.channel

    def remove(self, request_id: str) -> None:
        """Forget a request and free its blocks. Idempotent; safe mid-pass."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return
        if seq.state == RUNNING:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.state = GONE
        self.kv.free(request_id)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._seqs

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- one pass -------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq.request_id)
        seq.state = WAITING
        seq.num_computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> StepPlan | None:
        """Pick this pass's work and allocate its blocks; ``None`` when idle."""
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted: list[str] = []
        allocate = self.kv.allocate

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = len(seq.tokens) - seq.num_computed
            if num_new > budget:
                if not cfg.enable_chunked_prefill:
                    i += 1
                    continue
                num_new = budget
            while not allocate(seq.request_id, seq.tokens, seq.num_computed + num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is seq:
                    break
            else:
                scheduled.append((seq, num_new))
                budget -= num_new
                i += 1
                continue
            break  # ``seq`` preempted itself: it was the last running sequence

        while (
            not preempted and self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs
        ):
            seq = self.waiting[0]
            cached = self.kv.lookup_prefix(seq.tokens)
            computed = min(cached, len(seq.tokens) - 1)
            if seq.kv_transfer_pending:
                computed = max(computed, len(seq.tokens) - 1)
            num_new = len(seq.tokens) - computed
            if num_new > budget:
                if not cfg.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.kv.allocate(seq.request_id, seq.tokens, computed + num_new):
                break
            if self.running and self.kv.free_blocks < self._watermark_blocks:
                self.kv.free(seq.request_id)
                break
            self.waiting.popleft()
            self.kv.record_admission(len(seq.tokens), cached)
            seq.cached_tokens = cached
            seq.num_computed = computed
            seq.kv_transfer_pending = False
            seq.state = RUNNING
            self.running.append(seq)
            scheduled.append((seq, num_new))
            budget -= num_new

        if not scheduled:
            return None
        decode = prefill = 0
        for seq, n in scheduled:
            if n == 1 and seq.decoding:
                decode += 1
            else:
                prefill += n
        return StepPlan(
            scheduled=scheduled,
            prefill_tokens=prefill,
            decode_seqs=decode,
            preempted=preempted,
            kv_utilisation=self.kv.used_blocks / self.kv.num_blocks,
        )

    def complete(self, plan: StepPlan) -> None:
        """Account a finished pass: advance, sample, deliver, free finished sequences."""
        low, high = TOKEN_ID_RANGE
        for seq, num_new in plan.scheduled:
            if seq.state != RUNNING:
                continue  # removed (cancelled / dropped) while the pass ran
            seq.num_computed += num_new
            tokens = seq.tokens
            if seq.num_computed < len(tokens):
                continue  # a prefill chunk; more to come
            token = seq.rng.randrange(low, high)
            tokens.append(token)
            seq.generated += 1
            finish = self._finish_reason(seq, token)
            seq.channel.push(token, finish)
            if finish is not None:
                self.remove(seq.request_id)
        self.steps += 1
        self.prefill_tokens += plan.prefill_tokens
        self.decode_tokens += plan.decode_seqs

    @staticmethod
    def _finish_reason(seq: Sequence, token: int) -> FinishReason | None:
        if seq.generated >= seq.min_tokens:
            if not seq.ignore_eos and token in seq.eos_token_ids:
                return FinishReason.EOS
            if token in seq.stop_token_ids:
                return FinishReason.STOP
        if seq.generated >= seq.max_tokens:
            return FinishReason.LENGTH
        return None

    def step(self) -> StepPlan | None:
        """One synchronous pass without sleeping (tests, tools). ``None`` when idle."""
        plan = self.schedule()
        if plan is None:
            return None
        t0 = time.perf_counter()
        if self.device is not None:
            self.device.run(plan.num_tokens)
        self.complete(plan)
        self.last_step_ms = (time.perf_counter() - t0) * 1000.0
        return plan

    # -- the loop -------------------------------------------------------------------
    def start(self) -> None:
        """Start the scheduler task on the running loop (once)."""
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="mocker-scheduler"
            )

    async def _run(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug here must not leave streams hanging
            log.exception("mocker scheduler loop failed; closing every request")
            self._closed = True
            self._close_all()

    async def _loop(self) -> None:
        clock = time.perf_counter
        due = clock()  # when the previous pass ended on the simulated clock
        yielded = due  # when the loop last gave the event loop a turn
        passes = 0  # passes run since then
        while not self._closed:
            plan = self.schedule()
            if plan is None:
                self._wake.clear()
                await self._wake.wait()
                due = yielded = clock()
                passes = 0
                continue
            t0 = clock()
            device = self.device
            if device is not None and device.device != "none":
                try:
                    if device.inline(plan.num_tokens):
                        device.run(plan.num_tokens)
                    else:
                        await asyncio.to_thread(device.run, plan.num_tokens)
                except Exception:  # noqa: BLE001 - the simulation goes on without the device
                    log.exception("mocker: device workload failed; pass continues without it")
            # This pass ends ``step_seconds`` after the previous one, on the simulated clock;
            # a loop that fell behind catches up by at most MAX_LAG_S (no unbounded bursts).
            due = max(due, t0 - MAX_LAG_S) + self.timing.step_seconds(
                plan.prefill_tokens, plan.decode_seqs, plan.kv_utilisation
            )
            now = clock()
            delay = due - now
            passes += 1
            busy = now - yielded
            if delay > MIN_SLEEP_S:
                await asyncio.sleep(delay)
                yielded, passes = clock(), 0
            elif busy >= MAX_LAG_S or (busy >= BUSY_SLICE_S and passes >= BUSY_PASSES):
                await asyncio.sleep(0)  # behind the clock: let the streams catch up now
                yielded, passes = clock(), 0
            if self._closed:
                break
            self.complete(plan)
            self.last_step_ms = (clock() - t0) * 1000.0

    async def stop(self) -> None:
        """Stop the loop, close every remaining channel and free every block. Idempotent."""
        self._closed = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - a crashed loop must not fail cleanup
                log.exception("mocker scheduler loop failed")
        self._close_all()

    def _close_all(self) -> None:
        for request_id in list(self._seqs):
            seq = self._seqs[request_id]
            self.remove(request_id)
            seq.channel.close()

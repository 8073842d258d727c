"""The engine core: a Hugging Face causal LM behind ``ContinuousBatchingManager``.

Threads (no torch call ever runs on the event loop):

* the **load thread** (one ``ThreadPoolExecutor`` worker, ``hf-load``): ``load()`` reads
  the weights, builds the paged KV cache and starts the manager; ``shutdown()`` stops
  it and frees device memory. Called once each, from the loop through ``to_thread``-style
  awaits (``EngineCore.start`` / ``EngineCore.close``).
* the **compute thread** (the manager's generation loop, ``hf-compute``): every forward
  pass, sampling, KV allocation and freeing. New requests join the running batch
  between steps; finished and cancelled ones leave it (their blocks are freed at the
  start of the next step).
* the **event loop**: ``submit`` (pure Python: builds the manager's ``RequestState``
  and puts it on the manager's thread-safe input queue) and ``cancel`` (a queue put).

Results go from the compute thread straight into each request's ``ThreadFeed`` (the
manager's ``OutputRouter`` is replaced by ``_FeedRouter``): one ``Delta`` per step with
the tokens that are new since the previous one, the last one marked ``finished``.

Statistics (``CoreStats``) are recomputed on the compute thread after every loop turn
(a step, or an idle wait of at most 0.1 s) and published as one immutable object, which
the loop reads without a lock.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

from backend_common import ThreadFeed
from backend_common.errors import engine_shutdown, invalid_arg, unknown

from .args import HfSettings
from .sampling import PARAMS_KWARG, PerRequestSampler, RequestParams, SamplingDefaults

__all__ = ["CoreInfo", "CoreStats", "Delta", "EngineCore", "STEP_BUCKETS_S"]

log = logging.getLogger(__name__)

CPU_KV_SEQUENCES = 4
"""On the CPU without --num-kv-blocks: the KV cache holds this many full-context sequences."""
CPU_MAX_BATCH_TOKENS = 512
"""On the CPU without --max-batch-tokens: the token budget of one forward step."""

STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class Delta:
    """What one step produced for one request (compute thread -> the request's feed)."""

    tokens: tuple[int, ...]
    finished: bool = False


@dataclass(frozen=True)
class CoreStats:
    running: int = 0
    waiting: int = 0
    kv_used_blocks: int = 0
    kv_total_blocks: int = 0
    steps: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_used_blocks / self.kv_total_blocks if self.kv_total_blocks else 0.0


@dataclass(frozen=True)
class CoreInfo:
    """What ``load`` found out: the model and cache shape the engine advertises."""

    device: str
    dtype: str
    context_length: int
    kv_block_size: int
    kv_total_blocks: int
    max_num_seqs: int
    max_batch_tokens: int
    vocab_size: int
    eos_ids: frozenset[int]
    bos_id: int | None
    defaults: SamplingDefaults


def _resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise invalid_arg(f"--device {requested}: no CUDA device is available on this machine")
    return requested


def _resolve_dtype(requested: str, device: str) -> Any:
    import torch

    if requested == "auto":
        # float32 on the CPU: bfloat16 matmuls there are slow and not exactly reproducible.
        return "auto" if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        requested
    ]


def _eos_ids(value: Any) -> frozenset[int]:
    if value is None:
        return frozenset()
    if isinstance(value, int):
        return frozenset([value]) if value >= 0 else frozenset()
    return frozenset(int(v) for v in value if v is not None and int(v) >= 0)


class _FeedRouter:
    """Replaces the manager's ``OutputRouter``: outputs go to the requests' feeds.

    Runs on the compute thread (``deliver_batch`` after each step; ``deliver`` and
    ``fail_and_deliver`` on errors). Keeps, per live request, how many tokens were
    already handed out, so each ``Delta`` carries only new tokens.
    """

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.result_handlers: dict[str, Any] = {}  # the manager's API expects it
        self._lock = threading.Lock()

    def deliver(self, output: Any) -> None:
        self.core._deliver(output)

    def deliver_batch(self, outputs: list[Any]) -> None:
        for output in outputs:
            self.core._deliver(output)

    def fail_and_deliver(self, state: Any, error: Exception) -> None:
        from transformers.generation.continuous_batching.requests import RequestStatus

        state.status = RequestStatus.FAILED
        state.error = str(error)
        self.core._deliver(state.to_generation_output())


class _Live:
    __slots__ = ("feed", "sent", "done")

    def __init__(self, feed: ThreadFeed[Delta]) -> None:
        self.feed = feed
        self.sent = 0
        self.done = False


class EngineCore:
    """A loaded model serving many requests at once. See the module docstring for threads."""

    def __init__(self, settings: HfSettings) -> None:
        self.settings = settings
        self.info: CoreInfo | None = None
        self.stats = CoreStats()
        self.on_step: Callable[[float], None] | None = None  # compute thread: step seconds
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-load")
        self._model: Any = None
        self._manager: Any = None
        self._live: dict[str, _Live] = {}
        self._live_lock = threading.Lock()
        self._counter = 0
        self._closed = False

    # -- lifecycle (event loop side; the work runs on the load thread) ------------------
    async def start(self) -> CoreInfo:
        import asyncio

        loop = asyncio.get_running_loop()
        self.info = await loop.run_in_executor(self._executor, self._load)
        return self.info

    async def close(self) -> None:
        """Stop the compute thread and free the model (once; later calls return at once)."""
        import asyncio

        if self._closed:
            return
        self._closed = True
        with self._live_lock:
            live = list(self._live.values())
            self._live.clear()
        for entry in live:
            entry.feed.fail(engine_shutdown("transformers engine is shutting down"))
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._shutdown)
        finally:
            self._executor.shutdown(wait=False)

    # -- load thread ---------------------------------------------------------------------
    def _load(self) -> CoreInfo:
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        s = self.settings
        device = _resolve_device(s.device)
        if s.cpu_threads > 0:
            torch.set_num_threads(s.cpu_threads)
        torch.manual_seed(s.seed)
        model = AutoModelForCausalLM.from_pretrained(
            s.model_path, dtype=_resolve_dtype(s.dtype, device), attn_implementation="sdpa"
        )
        model = cast(Any, model).to(device)
        model.eval()
        gen = getattr(model, "generation_config", None) or GenerationConfig()
        text_config = model.config.get_text_config()
        eos_ids = _eos_ids(gen.eos_token_id) or _eos_ids(getattr(text_config, "eos_token_id", None))
        bos_id = gen.bos_token_id if gen.bos_token_id is not None else text_config.bos_token_id
        context_length = int(
            s.context_length or getattr(text_config, "max_position_embeddings", 0) or 4096
        )

        # The manager runs greedy (argmax) with our per-request processor deciding each
        # row; synchronous batching and no CUDA graphs keep the processor's view of the
        # batch exact (see sampling.py).
        manager_gen = GenerationConfig(
            do_sample=False,
            max_new_tokens=context_length,
            eos_token_id=sorted(eos_ids) or -1,
            pad_token_id=gen.pad_token_id if gen.pad_token_id is not None else 0,
        )
        num_blocks, max_batch_tokens = s.num_kv_blocks, s.max_batch_tokens
        if not device.startswith("cuda"):
            # transformers sizes the cache from free *device* memory; on the CPU that is the
            # machine's RAM. Size it for CPU_KV_SEQUENCES full-context sequences instead.
            num_blocks = num_blocks or CPU_KV_SEQUENCES * -(-context_length // s.block_size)
            max_batch_tokens = max_batch_tokens or CPU_MAX_BATCH_TOKENS
        cb = ContinuousBatchingConfig(
            page_size=s.block_size,
            num_blocks=num_blocks,
            max_batch_tokens=max_batch_tokens,
            max_requests_per_batch=s.max_num_seqs,
            max_memory_percent=s.kv_memory_fraction if device.startswith("cuda") else None,
            allow_block_sharing=s.enable_prefix_caching,
            use_async_batching=False,
            use_cuda_graph=False,
            auto_switch_to_flash=False,
            seed=s.seed,
        )
        sampler = PerRequestSampler(torch.device(device), s.seed)
        manager = _make_manager(self, model, manager_gen, cb, sampler)
        manager.start()
        deadline = time.monotonic() + 600
        while manager.batch_processor is None:  # the compute thread builds the cache
            if not manager.is_running() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the transformers batch manager failed to start: "
                    f"{manager.background_thread_status.fatal_error}"
                )
            time.sleep(0.01)
        cache = manager.batch_processor.cache
        self._model, self._manager = model, manager
        info = CoreInfo(
            device=str(model.device),
            dtype=str(model.dtype).removeprefix("torch."),
            context_length=context_length,
            kv_block_size=s.block_size,
            kv_total_blocks=int(cache.num_blocks),
            max_num_seqs=int(manager.continuous_batching_config.max_requests_per_batch),
            max_batch_tokens=int(cache.max_batch_tokens),
            vocab_size=int(text_config.vocab_size),
            eos_ids=eos_ids,
            bos_id=bos_id,
            defaults=SamplingDefaults.from_generation_config(gen),
        )
        self.stats = CoreStats(kv_total_blocks=info.kv_total_blocks)
        log.info(
            "transformers engine loaded %s on %s (%s): context %d, KV %d blocks x %d tokens, "
            "max batch tokens %d, max seqs %d",
            s.model_path,
            info.device,
            info.dtype,
            info.context_length,
            info.kv_total_blocks,
            info.kv_block_size,
            info.max_batch_tokens,
            info.max_num_seqs,
        )
        return info

    def _shutdown(self) -> None:
        manager, self._manager = self._manager, None
        if manager is not None:
            try:
                manager.stop(block=True, timeout=30, hard_stop=True)
                manager.destroy()
            except Exception:  # noqa: BLE001 - shutdown must go on
                log.exception("transformers engine: stopping the batch manager failed")
        self._model = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            log.exception("transformers engine: freeing device memory failed")

    # -- event loop side -----------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._manager is not None and not self._closed and self._manager.is_running()

    def submit(self, request_id: str, token_ids: list[int], params: RequestParams) -> ThreadFeed:
        """Queue one request; its deltas arrive on the returned feed. Loop thread only."""
        manager = self._manager
        if manager is None or self._closed or not manager.is_running():
            raise engine_shutdown("transformers engine is not running")
        feed: ThreadFeed[Delta] = ThreadFeed()
        with self._live_lock:
            self._counter += 1
            rid = f"{request_id}#{self._counter}"
            self._live[rid] = _Live(feed)
        feed.on_cancel(lambda: self.cancel(rid))
        added = manager.add_request(
            input_ids=list(token_ids),
            request_id=rid,
            max_new_tokens=params.max_tokens,
            streaming=True,
            eos_token_id=params.finish_ids or [-1],
            **{PARAMS_KWARG: params},
        )
        if added is None:
            with self._live_lock:
                self._live.pop(rid, None)
            raise engine_shutdown("transformers engine is not accepting requests")
        return feed

    def cancel(self, rid: str) -> None:
        """Drop a request from the batch (its KV blocks are freed at the next step)."""
        with self._live_lock:
            entry = self._live.pop(rid, None)
        if entry is None or entry.done:
            return
        manager = self._manager
        if manager is not None:
            manager.cancel_request(rid)

    # -- compute thread ------------------------------------------------------------------
    def _deliver(self, output: Any) -> None:
        rid = output.request_id
        with self._live_lock:
            entry = self._live.get(rid)
            if entry is not None and output.is_finished():
                entry.done = True
                del self._live[rid]
        if entry is None:
            return  # cancelled meanwhile: nobody is listening
        tokens = output.generated_tokens
        new = tuple(tokens[entry.sent :])
        entry.sent = len(tokens)
        if output.error is not None:
            if new:
                entry.feed.put(Delta(new))
            entry.feed.fail(unknown(f"transformers engine failed the request: {output.error}"))
        elif output.is_finished():
            entry.feed.close(Delta(new, finished=True))
        elif new:
            entry.feed.put(Delta(new))

    def _after_turn(self, batch_processor: Any, stepped: bool, seconds: float) -> None:
        scheduler = batch_processor.scheduler
        cache = batch_processor.cache
        used = 0
        for allocator in cache.cache_allocators.values():
            used = max(used, len({b for t in allocator.block_table.values() for b in t}))
        waiting = len(scheduler.waiting_requests) + self._manager_queue_size()
        previous = self.stats
        self.stats = CoreStats(
            running=len(scheduler.active_requests),
            waiting=waiting,
            kv_used_blocks=used,
            kv_total_blocks=previous.kv_total_blocks,
            steps=previous.steps + (1 if stepped else 0),
        )
        if stepped and self.on_step is not None:
            self.on_step(seconds)

    def _manager_queue_size(self) -> int:
        manager = self._manager
        return manager.input_queue.qsize() if manager is not None else 0


def _make_manager(core: EngineCore, model: Any, gen: Any, cb: Any, sampler: Any) -> Any:
    """A ``ContinuousBatchingManager`` wired to ``core`` (load thread)."""
    from transformers.generation.continuous_batching.continuous_api import (
        ContinuousBatchingManager,
    )
    from transformers.generation.logits_process import LogitsProcessorList

    class Manager(ContinuousBatchingManager):
        def __init__(self) -> None:
            super().__init__(model=model, generation_config=gen, continuous_batching_config=cb)
            self.output_router = cast(Any, _FeedRouter(core))
            # Our processor is the only one: it is what makes sampling per request.
            lp = self.logit_processor
            lp.logits_processor = LogitsProcessorList([sampler])
            lp.tensors_required = 1
            lp._retrieve_processors_kwargs()
            lp.do_processing = True

        def start(self) -> None:
            super().start()
            if self._generation_thread is not None:
                self._generation_thread.name = "hf-compute"

        def _generation_loop_body(self, batch_processor: Any, bootstrapping: bool) -> bool:
            before = getattr(self, "current_batch", 0)
            t0 = time.perf_counter()
            result = super()._generation_loop_body(batch_processor, bootstrapping)
            stepped = getattr(self, "current_batch", 0) != before
            try:
                core._after_turn(batch_processor, stepped, time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 - statistics never stop the batch
                log.exception("transformers engine: statistics update failed")
            return result

    return Manager()

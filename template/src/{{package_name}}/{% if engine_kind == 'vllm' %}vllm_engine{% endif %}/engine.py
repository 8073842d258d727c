"""``VllmEngine``: vLLM's ``AsyncLLM`` behind the ``LLMEngine`` contract.

Lifecycle (the worker calls each once, docs/contract.md):

* ``from_config(args, config)`` builds ``AsyncEngineArgs`` from vLLM's own flags
  (``args.py``) and Dynamo's defaults; nothing starts yet.
* ``start`` builds the ``AsyncLLM`` on a thread (vLLM spawns its engine core process and
  profiles memory: tens of seconds on a CPU; the event loop stays free for discovery
  heartbeats meanwhile) and returns an ``EngineConfig`` read from the live engine's
  ``VllmConfig``: context length, KV block size and total blocks, ``max_num_seqs``,
  ``max_num_batched_tokens``, data-parallel size, vocabulary size. It then watches the
  engine core (``ENGINE_WATCH_INTERVAL_S``).
* ``cleanup`` shuts the engine core down exactly once (``AsyncLLM.shutdown``: the core
  process exits); later calls do nothing. vLLM 0.31 and 0.32 leave one shared-memory
  object to Python's resource tracker after some workloads, which unlinks it at exit
  (it logs "leaked shared_memory objects").

Per request (``generate``): the request becomes ``SamplingParams`` (``sampling.py``:
exact mapping, typed ``InvalidArgument`` otherwise), the user hook
``adjust_sampling_params`` may change them, and vLLM streams delta outputs: one stream
item per engine step, tokens only (``detokenize=False``), passed through the user hook
``postprocess_output``. ``ctx`` stop/kill, client disconnect and a dropped stream abort
the request in vLLM (its KV blocks are freed at the next step) and end with a
``cancelled`` terminal. vLLM's validation errors are ``InvalidArgument`` (HTTP 400).

Engine-core death (the ``VLLM::EngineCore`` process exits): every in-flight stream ends
with a typed ``EngineShutdown`` error, and the watcher asks the worker to shut down
(SIGTERM twice: leave discovery, skip the grace waits); ``engine_died()`` then tells
``__main__`` to exit with ``ENGINE_DEAD_EXIT_CODE`` so a supervisor restarts the worker.

KV routing: prefix caching is on, vLLM's ZMQ KV event publisher binds one port per
data-parallel rank on 127.0.0.1 and ``kv_event_sources`` hands the worker one
``ZmqSource`` per rank. vLLM's Prometheus metrics (``vllm:*``) land in the global registry
that the worker's ``/metrics`` also serves; its scheduler stats feed the per-rank
``dynamo_component_*`` KV gauges through the snapshot publisher (``stats.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any, Self

from backend_common import (
    DisaggregationMode,
    EngineConfig,
    FinishReason,
    GenerateContext,
    LLMEngine,
    LLMEngineOutput,
    PreprocessedRequest,
    WorkerConfig,
    usage,
)
from backend_common.errors import DynamoError, engine_shutdown, invalid_arg, unknown
from backend_common.kv_events import ComponentSnapshot, PushSource, SnapshotPublisher, ZmqSource
from backend_common.types import mark_as_probe
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

from .args import add_vllm_args, engine_args_from
from .sampling import Limits, logprob_fields, prompt_logprob_entries, sampling_params
from .stats import RankStats, recorder_factory

__all__ = ["ENGINE_DEAD_EXIT_CODE", "VllmEngine", "engine_died"]

log = logging.getLogger(__name__)

ENGINE_WATCH_INTERVAL_S = 0.1
"""How often ``start``'s watcher checks that the engine core is alive."""

ENGINE_DEAD_EXIT_CODE = 3
"""The worker's exit status after its engine core died (0: a clean shutdown)."""

_DIED = False


def engine_died() -> bool:
    """True once a ``VllmEngine`` in this process saw its engine core die."""
    return _DIED


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class VllmEngine(LLMEngine):
    """vLLM's ``AsyncLLM`` as a Dynamo engine; subclass it in ``engine.py`` (the hooks below)."""

    def __init__(self, engine_args: AsyncEngineArgs, *, model: str) -> None:
        self.engine_args = engine_args
        self.model = model
        self.llm: Any = None  # vllm.v1.engine.async_llm.AsyncLLM once started
        self.limits: Limits | None = None
        self.stats = RankStats()
        self.dp_size = 1
        self.bos_id: int | None = None
        self._snapshots: SnapshotPublisher | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False
        self._dead = False

    # -- extension points (override in engine.py) ------------------------------------
    def adjust_sampling_params(
        self, params: SamplingParams, request: PreprocessedRequest
    ) -> SamplingParams:
        """Change the ``SamplingParams`` of one request before vLLM sees them. Default: as is."""
        return params

    def postprocess_output(
        self, output: LLMEngineOutput, completion: CompletionOutput, request: PreprocessedRequest
    ) -> LLMEngineOutput:
        """Change one stream item (tokens, logprobs, ...) before it is sent. Default: as is."""
        return output

    # -- construction --------------------------------------------------------------------
    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        add_vllm_args(parser)

    @classmethod
    def from_config(cls, args: argparse.Namespace, config: WorkerConfig) -> Self:
        if config.disaggregation_mode is not DisaggregationMode.AGGREGATED:
            raise invalid_arg("the vllm engine serves the aggregated role only")
        model_path = config.model_path or args.model
        if not model_path:
            raise invalid_arg("--model (or --model-path) is required: a model directory or hub id")
        config.model_path = model_path
        if not config.model_name:
            config.model_name = model_path.rstrip("/").rsplit("/", 1)[-1]
        # vLLM binds only wildcard endpoints (a host address makes it connect instead).
        endpoint = f"tcp://*:{_free_port()}" if config.enable_kv_routing else None
        engine_args = engine_args_from(args, model_path, kv_events_endpoint=endpoint)
        return cls(engine_args, model=config.public_name)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, worker_id: int) -> EngineConfig:
        if self._started:
            raise engine_shutdown("vllm engine already started")
        self._started = True
        from vllm.v1.engine.async_llm import AsyncLLM

        try:
            self.llm = await asyncio.to_thread(
                AsyncLLM.from_engine_args,
                self.engine_args,
                stat_loggers=[recorder_factory(self.stats)],
            )
        except (ValueError, VLLMClientError) as exc:
            raise invalid_arg(f"vLLM refused the engine arguments: {exc}") from None
        vc = self.llm.vllm_config
        mc, cc, sc, pc = vc.model_config, vc.cache_config, vc.scheduler_config, vc.parallel_config
        self.dp_size = pc.data_parallel_size
        self.limits = Limits(
            context_length=mc.max_model_len,
            vocab_size=mc.get_vocab_size(),
            structured_outputs_backend=str(vc.structured_outputs_config.backend),
            max_logprobs=mc.max_logprobs,
        )
        self.bos_id = getattr(mc.hf_config, "bos_token_id", None)
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_engine())
        return EngineConfig(
            model=self.model,
            served_model_name=self.model,
            context_length=mc.max_model_len,
            kv_cache_block_size=cc.block_size,
            total_kv_blocks=cc.num_gpu_blocks,
            max_num_seqs=sc.max_num_seqs,
            max_num_batched_tokens=sc.max_num_batched_tokens,
            data_parallel_size=self.dp_size,
            vocab_size=self.limits.vocab_size,
        )

    async def cleanup(self) -> None:
        """Shut the engine core down, once (later calls, and a never-started engine: nothing)."""
        if self._closed:
            return
        self._closed = True
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self.llm is not None:
            llm, self.llm = self.llm, None
            await asyncio.to_thread(llm.shutdown)
        log.info("vllm engine: cleanup done")

    async def _watch_engine(self) -> None:
        while not self._closed:
            if self.llm is not None and self.llm.errored:
                self._on_engine_dead()
                return
            await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)

    def _on_engine_dead(self) -> None:
        global _DIED
        if self._dead:
            return
        self._dead = _DIED = True
        log.error(
            "vLLM engine core died: shutting the worker down (exit %d)", ENGINE_DEAD_EXIT_CODE
        )
        # The first signal withdraws the model from discovery, the second skips the grace
        # waits: nothing could be served any more.
        os.kill(os.getpid(), signal.SIGTERM)
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)

    # -- requests --------------------------------------------------------------------------
    async def generate(
        self, request: PreprocessedRequest, ctx: GenerateContext
    ) -> AsyncIterator[LLMEngineOutput]:
        llm, limits = self.llm, self.limits
        if llm is None or limits is None or self._closed:
            raise engine_shutdown("the vllm engine is not running")
        if self._dead:
            raise engine_shutdown("the vLLM engine core died")
        params = self.adjust_sampling_params(sampling_params(request, limits), request)
        prompt_len = len(request.token_ids)
        if ctx.is_stopped():
            yield LLMEngineOutput.cancelled().with_usage(usage(prompt_len, 0))
            return
        request_id = f"{ctx.id()}-{uuid.uuid4().hex[:8]}"
        stream = llm.generate(
            TokensPrompt(prompt_token_ids=list(request.token_ids)), params, request_id
        )
        generated = 0
        stopped = asyncio.ensure_future(ctx.stopped())
        try:
            while True:
                step = asyncio.ensure_future(anext(stream))
                await asyncio.wait((step, stopped), return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    # Cancelling the pending step makes vLLM abort the request.
                    step.cancel()
                    await asyncio.gather(step, return_exceptions=True)
                    yield LLMEngineOutput.cancelled().with_usage(usage(prompt_len, generated))
                    return
                try:
                    out: RequestOutput = step.result()
                except StopAsyncIteration:
                    raise engine_shutdown("vLLM ended the stream without a finish") from None
                completion = out.outputs[0]
                generated += len(completion.token_ids)
                item = self._item(out, completion, prompt_len, generated, ctx)
                yield self.postprocess_output(item, completion, request)
                if item.finish_reason is not None:
                    return
        except DynamoError:
            raise
        except EngineDeadError:
            self._on_engine_dead_from_stream()
            raise engine_shutdown("the vLLM engine core died") from None
        except (ValueError, VLLMClientError) as exc:
            raise invalid_arg(str(exc)) from None
        except EngineGenerateError as exc:
            cause = exc.__cause__
            if isinstance(cause, ValueError | VLLMClientError):
                raise invalid_arg(str(cause)) from None
            raise unknown(f"vLLM failed the request: {cause or exc}") from None
        finally:
            stopped.cancel()
            await stream.aclose()

    def _on_engine_dead_from_stream(self) -> None:
        if self.llm is not None:
            self._on_engine_dead()

    def _item(
        self,
        out: RequestOutput,
        completion: CompletionOutput,
        prompt_len: int,
        generated: int,
        ctx: GenerateContext,
    ) -> LLMEngineOutput:
        item = LLMEngineOutput(list(completion.token_ids))
        if completion.logprobs:
            item.log_probs, item.top_logprobs = logprob_fields(completion)
        if out.prompt_logprobs:
            item.engine_data = {"prompt_logprobs": prompt_logprob_entries(out)}
        if not out.finished:
            return item
        reason = completion.finish_reason
        if reason == "length":
            item.finish_reason = FinishReason.LENGTH
        elif reason == "stop":
            stop = completion.stop_reason
            item.finish_reason = FinishReason.STOP if isinstance(stop, int) else FinishReason.EOS
        elif reason == "abort" and ctx.is_stopped():
            item.finish_reason = FinishReason.CANCELLED
        else:
            raise unknown(f"vLLM ended the request with finish_reason={reason!r}")
        return item.with_usage(usage(prompt_len, generated))

    # -- worker hooks ------------------------------------------------------------------------
    async def health_check_payload(self) -> dict[str, Any] | None:
        """One greedy token after BOS (the canary the worker sends itself when idle)."""
        return mark_as_probe(
            {
                "token_ids": [self.bos_id if self.bos_id is not None else 0],
                "stop_conditions": {"max_tokens": 1, "ignore_eos": True},
                "sampling_options": {"temperature": 0.0},
            }
        )

    async def kv_event_sources(self) -> list[PushSource | ZmqSource]:
        cfg = self.engine_args.kv_events_config
        if cfg is None or not cfg.enable_kv_cache_events:
            return []
        host, _, port = cfg.endpoint.rpartition(":")
        host = host.replace("*", "127.0.0.1")
        # vLLM binds rank r's publisher on the configured port + r.
        return [
            ZmqSource(endpoint=f"{host}:{int(port) + rank}", topic=cfg.topic, dp_rank=rank)
            for rank in range(self.dp_size)
        ]

    def component_metrics_dp_ranks(self) -> list[int]:
        return list(range(self.dp_size))

    def attach_snapshot_publisher(self, publisher: SnapshotPublisher) -> None:
        self._snapshots = publisher
        self.stats.on_update = self._publish_snapshot
        for rank in range(self.dp_size):
            self._publish_snapshot(rank)

    def _publish_snapshot(self, rank: int) -> None:
        publisher = self._snapshots
        total = self.llm.vllm_config.cache_config.num_gpu_blocks if self.llm is not None else 0
        if publisher is None or not total:
            return
        snap = self.stats.latest.get(rank)
        usage_fraction = snap.kv_usage if snap is not None else 0.0
        publisher.publish(
            rank,
            ComponentSnapshot(
                kv_used_blocks=round(usage_fraction * total),
                kv_total_blocks=total,
                gpu_cache_usage=usage_fraction,
                dp_rank=rank,
            ),
        )

"""Tests of the mocker engine: KV accounting, scheduling, stop rules, roles, device, contract.

Scheduler tests drive passes synchronously (``Scheduler.step``); engine tests
run the real asyncio scheduler at ``--speedup-ratio 0`` (no simulated delay),
so nothing here depends on wall-clock timing.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from backend_common import DisaggregationMode, FinishReason, GenerateContext, PreprocessedRequest
from backend_common.errors import BackendError, DynamoError
from backend_common.request_policy import check_request
from backend_common.testing import collect, run_conformance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from mocker_cuda.engine import MockerCudaEngine as Engine
from mocker_cuda.mocker import scheduler as scheduler_module
from mocker_cuda.mocker.args import MockerSettings
from mocker_cuda.mocker.channel import TokenChannel
from mocker_cuda.mocker.device import DeviceWorkload, percentile
from mocker_cuda.mocker.kv_cache import KvCache
from mocker_cuda.mocker.metrics import METRIC_NAMES
from mocker_cuda.mocker.scheduler import (
    BUSY_PASSES,
    TOKEN_ID_RANGE,
    Scheduler,
    SchedulerConfig,
    Sequence,
)
from mocker_cuda.mocker.timing import TimingModel, decode_ms, prefill_ms

FAST = ["--speedup-ratio", "0", "--device", "none"]


def seq(rid: str, prompt: list[int], max_tokens: int = 4, **kw) -> Sequence:
    return Sequence.new(rid, prompt, max_tokens=max_tokens, **kw)


def drain_channel(channel: TokenChannel) -> list[int]:
    return channel.take()


def run_to_idle(scheduler: Scheduler, max_steps: int = 10_000) -> list:
    plans = []
    for _ in range(max_steps):
        plan = scheduler.step()
        scheduler.kv.check_invariants()
        if plan is None:
            return plans
        plans.append(plan)
    raise AssertionError("scheduler did not go idle")


def tokens_of(items: list) -> list[int]:
    return [t for item in items for t in item.token_ids]


def request(tokens: list[int], **stop) -> PreprocessedRequest:
    return PreprocessedRequest(model="m", token_ids=tokens, stop_conditions=stop)


@pytest.fixture
async def engine_factory():
    engines: list[Engine] = []

    async def make(*argv: str, mode: str | None = None) -> Engine:
        args = [*FAST, *argv]
        if mode is not None:
            args += ["--disaggregation-mode", mode]
        engine, _config = Engine.from_args(args)
        engines.append(engine)
        await engine.start(0)
        return engine

    try:
        yield make
    finally:
        for engine in engines:
            await engine.cleanup()


# -- KV cache -------------------------------------------------------------------------


def test_kv_cache_shares_prefix_blocks_and_frees_them():
    kv = KvCache(num_blocks=8, block_size=4)
    prompt = list(range(10))  # 2 full blocks + a partial one
    assert kv.allocate("a", prompt, 10)
    assert kv.used_blocks == 3
    assert kv.lookup_prefix(prompt) == 8
    assert kv.allocate("b", prompt, 10)
    assert kv.used_blocks == 4  # the 2 full blocks are shared; each has its own tail
    kv.check_invariants()
    kv.free("a")
    kv.free("a")  # idempotent
    kv.free("b")
    assert kv.used_blocks == 0 and kv.free_blocks == 8
    assert kv.stats().evictable_blocks == 2  # cached for the next request with this prefix
    kv.check_invariants()


def test_kv_cache_allocation_is_all_or_nothing_and_evicts_lru():
    kv = KvCache(num_blocks=4, block_size=4)
    assert kv.allocate("a", list(range(16)), 16)
    assert not kv.allocate("b", list(range(100, 104)), 4)
    assert not kv.holds("b")
    kv.free("a")
    assert kv.allocate("b", list(range(100, 116)), 16)  # evicts every cached block of "a"
    assert kv.stats().evictable_blocks == 0
    assert kv.lookup_prefix(list(range(16))) == 0
    kv.check_invariants()


def test_kv_cache_without_prefix_caching_never_shares():
    kv = KvCache(num_blocks=8, block_size=4, enable_prefix_caching=False)
    assert kv.allocate("a", list(range(8)), 8)
    assert kv.allocate("b", list(range(8)), 8)
    assert kv.used_blocks == 4
    assert kv.lookup_prefix(list(range(8))) == 0
    kv.free("a")
    kv.free("b")
    assert kv.used_blocks == 0 and kv.stats().evictable_blocks == 0


# -- scheduler ----------------------------------------------------------------------------


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    requests=st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=40),  # prompt length
            st.integers(min_value=1, max_value=12),  # max tokens
            st.integers(min_value=0, max_value=3),  # prompt family (shared prefixes)
            st.one_of(st.none(), st.integers(min_value=0, max_value=12)),  # cancel at step
        ),
        min_size=1,
        max_size=12,
    ),
    num_blocks=st.integers(min_value=13, max_value=24),
    budget=st.integers(min_value=4, max_value=64),
    chunked=st.booleans(),
    caching=st.booleans(),
)
def test_blocks_never_leak(requests, num_blocks, budget, chunked, caching):
    config = SchedulerConfig(
        num_blocks=num_blocks,
        block_size=4,
        max_num_seqs=4,
        max_num_batched_tokens=budget if chunked else 64,
        enable_prefix_caching=caching,
        enable_chunked_prefill=chunked,
        watermark=0.0,
    )
    scheduler = Scheduler(config)
    cancel_at: dict[int, list[str]] = {}
    channels = {}
    for i, (length, max_tokens, family, cancel) in enumerate(requests):
        prompt = [family * 1000 + t for t in range(length)]
        rid = f"r{i}"
        channels[rid] = scheduler.add(seq(rid, prompt, max_tokens))
        if cancel is not None:
            cancel_at.setdefault(cancel, []).append(rid)
    for step in range(10_000):
        for rid in cancel_at.pop(step, []):
            scheduler.remove(rid)
        plan = scheduler.step()
        scheduler.kv.check_invariants()
        assert scheduler.kv.used_blocks <= num_blocks
        if plan is None and not cancel_at:
            break
        if plan is not None:
            assert plan.num_tokens <= config.max_num_batched_tokens
    else:
        raise AssertionError("scheduler did not go idle")
    assert scheduler.num_running == scheduler.num_waiting == 0
    assert scheduler.kv.used_blocks == 0
    assert scheduler.kv.free_blocks == num_blocks
    for i, (_length, max_tokens, _family, cancel) in enumerate(requests):
        outputs = drain_channel(channels[f"r{i}"])
        if cancel is None:
            assert len(outputs) == max_tokens
            assert channels[f"r{i}"].finish is FinishReason.LENGTH


def test_small_pool_preempts_and_output_does_not_depend_on_scheduling():
    prompts = [[p * 100 + t for t in range(20)] for p in range(6)]

    def run(num_blocks: int) -> tuple[dict[str, list[int]], int]:
        scheduler = Scheduler(
            SchedulerConfig(
                num_blocks=num_blocks, block_size=4, max_num_batched_tokens=64, watermark=0.0
            )
        )
        channels = {f"r{i}": scheduler.add(seq(f"r{i}", p, 24)) for i, p in enumerate(prompts)}
        run_to_idle(scheduler)
        assert scheduler.kv.used_blocks == 0
        tokens = {rid: drain_channel(ch) for rid, ch in channels.items()}
        return tokens, scheduler.preemptions

    roomy, roomy_preemptions = run(1024)
    tight, tight_preemptions = run(12)
    assert roomy_preemptions == 0
    assert tight_preemptions > 0
    assert tight == roomy
    assert all(len(t) == 24 for t in tight.values())


def test_prefix_caching_hits_on_repeated_prompts():
    scheduler = Scheduler(SchedulerConfig(num_blocks=64, block_size=4))
    prompt = list(range(32))
    scheduler.add(seq("a", prompt, 2))
    run_to_idle(scheduler)
    assert scheduler.kv.stats().hit_rate == 0.0
    second = seq("b", prompt, 2)
    scheduler.add(second)
    plan = scheduler.step()
    assert second.cached_tokens == 32
    assert plan.prefill_tokens == 1  # one token is still computed, to sample from
    run_to_idle(scheduler)
    assert scheduler.kv.stats().hit_rate == pytest.approx(0.5)


def test_chunked_prefill_respects_the_token_budget():
    scheduler = Scheduler(SchedulerConfig(num_blocks=64, block_size=4, max_num_batched_tokens=16))
    scheduler.add(seq("long", list(range(50)), 3))
    scheduler.add(seq("short", list(range(100, 105)), 3))
    plans = run_to_idle(scheduler)
    assert all(p.num_tokens <= 16 for p in plans)
    assert plans[0].scheduled[0][1] == 16  # the long prompt is split
    assert sum(n for p in plans for s, n in p.scheduled if s.request_id == "long") >= 50


def test_without_chunked_prefill_a_prompt_over_the_budget_is_refused():
    scheduler = Scheduler(
        SchedulerConfig(
            num_blocks=64, block_size=4, max_num_batched_tokens=16, enable_chunked_prefill=False
        )
    )
    with pytest.raises(ValueError, match="KV cache"):
        scheduler.add(seq("long", list(range(50)), 3))
    scheduler.add(seq("ok", list(range(10)), 3))
    plans = run_to_idle(scheduler)
    assert plans[0].scheduled[0][1] == 10


def test_max_num_seqs_caps_the_running_queue():
    scheduler = Scheduler(SchedulerConfig(num_blocks=64, block_size=4, max_num_seqs=2))
    for i in range(5):
        scheduler.add(seq(f"r{i}", [i, i + 1], 3))
    scheduler.step()
    assert scheduler.num_running == 2 and scheduler.num_waiting == 3
    run_to_idle(scheduler)
    assert scheduler.kv.used_blocks == 0


def test_watermark_holds_back_an_admission_that_would_leave_too_few_blocks():
    scheduler = Scheduler(SchedulerConfig(num_blocks=100, block_size=4, watermark=0.1))
    scheduler.add(seq("big", list(range(320)), 1))  # 80 blocks: admitted alone
    scheduler.add(seq("next", list(range(1000, 1044)), 1))  # 11 more would leave 9 < 10
    first = scheduler.step()
    assert [s.request_id for s, _ in first.scheduled] == ["big"]
    second = scheduler.step()  # "big" finished and freed its blocks
    assert [s.request_id for s, _ in second.scheduled] == ["next"]
    run_to_idle(scheduler)
    assert scheduler.kv.used_blocks == 0


def test_token_ids_are_deterministic_given_the_seed():
    def tokens(seed: int, prompt: list[int]) -> list[int]:
        scheduler = Scheduler(SchedulerConfig(num_blocks=64, block_size=4), seed=seed)
        channel = scheduler.add(seq("r", prompt, 8, seed=seed))
        run_to_idle(scheduler)
        return drain_channel(channel)

    assert tokens(7, [1, 2, 3]) == tokens(7, [1, 2, 3])
    assert tokens(7, [1, 2, 3]) != tokens(8, [1, 2, 3])
    assert tokens(7, [1, 2, 3]) != tokens(7, [1, 2, 4])
    lo, hi = TOKEN_ID_RANGE
    assert all(lo <= t < hi for t in tokens(7, [1, 2, 3]))


async def test_a_loop_behind_its_clock_hands_several_passes_to_each_wake_up(monkeypatch):
    """Every pass here outlasts the busy slice (a fake clock, 0.4 ms per reading): the loop
    still runs BUSY_PASSES passes before it yields, so each stream wakes up to that many
    tokens, not one token per wake-up (which made a token cost more the more streams ran)."""
    now = [0.0]

    def fake_clock() -> float:
        now[0] += 0.0004
        return now[0]

    monkeypatch.setattr(scheduler_module.time, "perf_counter", fake_clock)
    scheduler = Scheduler(SchedulerConfig(num_blocks=64, block_size=4), timing=TimingModel(0.0))
    max_tokens = 4 * BUSY_PASSES
    channels = [
        scheduler.add(Sequence.new(f"r{i}", [1, 2, 3], max_tokens=max_tokens)) for i in range(8)
    ]

    async def consume(channel: TokenChannel) -> list[int]:
        seen = []
        while channel.finish is None or channel:
            await channel.wait()
            seen.append(len(channel.take()))
        return seen

    scheduler.start()
    try:
        wakes = await asyncio.wait_for(asyncio.gather(*(consume(c) for c in channels)), 10)
    finally:
        await scheduler.stop()
    for seen in wakes:
        assert sum(seen) == max_tokens
        # A pass's tokens are delivered after its yield check: the first wake-up gets one
        # pass less, the last one what is left; every one between gets a full slice.
        assert len(seen) >= 3 and min(seen[1:-1]) >= BUSY_PASSES, seen


# -- timing and device --------------------------------------------------------------------------


def test_timing_model_follows_the_polynomial():
    assert prefill_ms(0) == 0.0
    assert prefill_ms(1000) == pytest.approx(4.209989e-07 * 1e6 + 1.518344e-02 * 1000 + 16.50142)
    assert decode_ms(0.0) == pytest.approx(5.74)
    assert decode_ms(1.0) == pytest.approx(-25.74 + 54.01 + 5.74)
    model = TimingModel(speedup_ratio=10.0)
    assert model.step_seconds(1000, 1, 0.0) == pytest.approx(
        (prefill_ms(1000) + decode_ms(0.0)) / 10.0 / 1000.0
    )
    assert TimingModel(0.0).step_seconds(1000, 8, 0.5) == 0.0


def test_device_workload_records_stats_on_cpu():
    device = DeviceWorkload("cpu", hidden_size=32, max_rows=64)
    for tokens in (1, 16, 200):
        assert device.run(tokens) >= 0.0
    stats = device.stats()
    assert stats.device == "cpu"
    assert stats.steps == 3 and len(stats.step_ms) == 3
    assert stats.tokens == 1 + 16 + 64  # rows are capped at max_rows
    assert stats.events_recorded == 0
    assert stats.peak_memory_bytes > 0
    assert stats.p50_ms <= stats.p99_ms
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0


def test_device_cuda_request_uses_the_gpu_or_falls_back_with_a_warning(caplog):
    import torch

    with caplog.at_level(logging.WARNING):
        device = DeviceWorkload("cuda", hidden_size=32, max_rows=64)
    device.run(8)
    stats = device.stats()
    if torch.cuda.is_available():
        assert stats.device == "cuda" and stats.events_recorded == 2
    else:
        assert stats.device == "cpu" and stats.steps == 1
        assert "falling back to cpu" in caplog.text
        # The stand-in stays small and single-threaded (torch's pool would spin every core).
        assert torch.get_num_threads() == 1
        assert device.hidden_size <= 64 and device.max_rows <= 64
        assert device.inline(8)


async def test_token_channel_takes_in_order_and_wakes_its_waiter():
    channel = TokenChannel()
    assert not channel.ready and channel.take() == []
    waiter = asyncio.create_task(channel.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    channel.push(7)
    channel.push(8)
    await asyncio.wait_for(waiter, 5)
    channel.push(9, FinishReason.LENGTH)
    assert channel.take_one() == [7] and len(channel) == 2
    assert channel.take() == [8, 9] and channel.finish is FinishReason.LENGTH
    assert channel.take() == [] and channel.take_one() == [] and not channel.ready
    # interrupt() wakes a waiter without data.
    waiter = asyncio.create_task(channel.wait())
    await asyncio.sleep(0)
    channel.interrupt()
    await asyncio.wait_for(waiter, 5)
    channel.close()
    assert channel.ready
    await asyncio.wait_for(channel.wait(), 5)  # closed: returns at once


# -- engine ------------------------------------------------------------------------------------


async def test_conformance_at_high_speedup_on_cpu():
    await run_conformance(
        lambda: Engine.from_args(["--speedup-ratio", "1000", "--device", "cpu"])[0]
    )


async def test_conformance_with_no_delay_and_a_tiny_pool():
    argv = [*FAST, "--num-gpu-blocks", "4", "--block-size", "4", "--max-num-seqs", "3"]
    await run_conformance(lambda: Engine.from_args(argv)[0])


async def test_from_args_defaults_follow_dynamo_mocker():
    engine, config = Engine.from_args([])
    s = engine.settings
    assert (s.block_size, s.num_gpu_blocks, s.max_num_seqs, s.max_num_batched_tokens) == (
        64,
        16384,
        256,
        8192,
    )
    assert s.enable_prefix_caching and s.enable_chunked_prefill
    assert (s.watermark, s.speedup_ratio, s.default_max_tokens) == (0.01, 1.0, 16)
    assert config.public_name == engine.model == "mocker-model"
    engine, _ = Engine.from_args(["--no-enable-prefix-caching", "--block-size", "0"])
    assert not engine.settings.enable_prefix_caching and engine.settings.block_size == 64
    with pytest.raises(SystemExit):
        Engine.from_args(["--speedup-ratio", "-1"])


async def test_default_max_tokens_when_absent(engine_factory):
    engine = await engine_factory("--default-max-tokens", "5")
    items = await collect(engine, request([1, 2, 3]))
    assert sum(len(i.token_ids) for i in items) == 5
    assert items[-1].finish_reason is FinishReason.LENGTH
    assert items[-1].completion_usage == {
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "total_tokens": 8,
    }


async def test_stop_rules(engine_factory):
    engine = await engine_factory()
    every_id = list(range(*TOKEN_ID_RANGE))
    eos = PreprocessedRequest(
        token_ids=[1, 2], eos_token_ids=every_id, stop_conditions={"max_tokens": 10}
    )
    items = await collect(engine, eos)
    assert len(items) == 1 and items[0].finish_reason is FinishReason.EOS

    eos.stop_conditions.min_tokens = 4
    items = await collect(engine, eos)
    assert sum(len(i.token_ids) for i in items) == 4 and items[-1].finish_reason is FinishReason.EOS

    eos.stop_conditions.min_tokens = None
    eos.stop_conditions.ignore_eos = True
    items = await collect(engine, eos)
    assert sum(len(i.token_ids) for i in items) == 10
    assert items[-1].finish_reason is FinishReason.LENGTH

    stop = request([1, 2], max_tokens=10, stop_token_ids=every_id, min_tokens=2)
    items = await collect(engine, stop)
    assert (
        sum(len(i.token_ids) for i in items) == 2 and items[-1].finish_reason is FinishReason.STOP
    )

    items = await collect(engine, request([1, 2], max_tokens=0))
    assert len(items) == 1 and items[0].finish_reason is FinishReason.LENGTH
    assert items[0].completion_usage["completion_tokens"] == 0


async def test_same_request_gives_same_tokens(engine_factory):
    engine = await engine_factory("--seed", "3")
    first = await collect(engine, request([5, 6, 7], max_tokens=6))
    second = await collect(engine, request([5, 6, 7], max_tokens=6))
    # Item boundaries depend on how fast the stream consumes; the token ids do not.
    assert tokens_of(first) == tokens_of(second) and len(tokens_of(first)) == 6


async def test_bad_requests_get_typed_errors(engine_factory):
    engine, _ = Engine.from_args(FAST)
    with pytest.raises(DynamoError) as err:
        await collect(engine, request([1]))
    assert err.value.backend_error is BackendError.EngineShutdown
    engine, _ = Engine.from_args([*FAST, "--context-length", "16"])
    config = await engine.start(0)
    try:
        # The worker's admission check against what start() returned, before generate.
        for bad in (request([]), request(list(range(16)))):
            with pytest.raises(DynamoError) as err:
                check_request(bad, config)
            assert err.value.backend_error is BackendError.InvalidArgument
    finally:
        await engine.cleanup()
    engine = await engine_factory("--context-length", "16")
    items = await collect(engine, request(list(range(10)), max_tokens=100))
    assert sum(len(i.token_ids) for i in items) == 6  # capped at the context length


async def test_prefill_role_returns_one_token_and_a_handoff(engine_factory):
    engine = await engine_factory(mode="prefill")
    items = await collect(engine, request([1, 2, 3], max_tokens=50))
    assert len(items) == 1
    final = items[0]
    assert final.finish_reason is FinishReason.LENGTH and len(final.token_ids) == 1
    assert final.completion_usage["completion_tokens"] == 1
    assert set(final.disaggregated_params) == {"mocker_handle", "completed_tokens"}
    assert final.disaggregated_params["completed_tokens"] == final.token_ids


async def test_decode_role_requires_the_prefill_result(engine_factory):
    engine = await engine_factory(
        "--kv-transfer-time-ms", "5", "--speedup-ratio", "1", mode="decode"
    )
    assert engine.mode is DisaggregationMode.DECODE
    with pytest.raises(DynamoError) as err:
        await collect(engine, request([1, 2, 3], max_tokens=4))
    assert err.value.backend_error is BackendError.InvalidArgument
    handoff = PreprocessedRequest.from_dict(
        {
            "token_ids": list(range(40)),
            "stop_conditions": {"max_tokens": 4},
            "prefill_result": {"disaggregated_params": {"mocker_handle": "x"}},
        }
    )
    items = await collect(engine, handoff)
    assert sum(len(i.token_ids) for i in items) == 4
    assert all(i.disaggregated_params is None for i in items)
    # The prompt's KV arrived from the peer: nothing was prefilled here.
    assert engine.scheduler.prefill_tokens == 0 and engine.scheduler.decode_tokens == 4
    probe = await engine.health_check_payload()
    assert probe["prefill_result"] == {"disaggregated_params": {}}
    items = await collect(engine, PreprocessedRequest.from_dict(probe))
    assert items[-1].finish_reason is FinishReason.LENGTH


async def test_cancellation_mid_stream_frees_blocks(engine_factory):
    engine = await engine_factory("--speedup-ratio", "1000", "--block-size", "4")
    ctx = GenerateContext()
    stream = engine.generate(request(list(range(30)), max_tokens=10_000), ctx)
    items = []
    async for item in stream:
        items.append(item)
        if len(items) == 3:
            ctx.stop_generating()
    assert items[-1].finish_reason is FinishReason.CANCELLED
    assert items[-1].completion_usage["completion_tokens"] == len(tokens_of(items)) >= 3
    assert engine.scheduler.kv.used_blocks == 0
    assert engine.scheduler.num_running == 0


async def _lagging_stream(engine) -> list:
    stream = engine.generate(request([1, 2, 3], max_tokens=40), GenerateContext())
    items = [await stream.__anext__()]
    for _ in range(200):  # the scheduler runs on while this consumer sleeps (bounded)
        if engine.scheduler.num_running == 0:
            break
        await asyncio.sleep(0.005)
    assert engine.scheduler.num_running == 0, "the scheduler should have finished meanwhile"
    items += [item async for item in stream]
    assert len(tokens_of(items)) == 40
    assert items[-1].finish_reason is FinishReason.LENGTH
    assert items[-1].completion_usage["completion_tokens"] == 40
    return items


async def test_a_lagging_stream_still_gets_one_token_per_item(engine_factory):
    engine = await engine_factory()
    items = await _lagging_stream(engine)
    assert [len(i.token_ids) for i in items] == [1] * 40


async def test_merge_lagging_tokens_puts_waiting_tokens_into_one_item(engine_factory):
    engine = await engine_factory("--merge-lagging-tokens")
    items = await _lagging_stream(engine)
    assert max(len(i.token_ids) for i in items) > 1


async def test_cancellation_wins_over_tokens_already_waiting(engine_factory):
    engine = await engine_factory()
    ctx = GenerateContext()
    stream = engine.generate(request([1, 2, 3], max_tokens=1000), ctx)
    first = await stream.__anext__()
    for _ in range(200):  # let tokens pile up in the channel (bounded)
        if engine.scheduler.steps > 20:
            break
        await asyncio.sleep(0.005)
    ctx.stop_generating()
    rest = [item async for item in stream]
    assert len(rest) == 1 and rest[0].finish_reason is FinishReason.CANCELLED
    assert rest[0].token_ids == []
    assert rest[0].completion_usage["completion_tokens"] == len(first.token_ids)
    assert engine.scheduler.kv.used_blocks == 0


async def test_dropped_stream_frees_blocks(engine_factory):
    engine = await engine_factory("--speedup-ratio", "1000", "--block-size", "4")
    stream = engine.generate(request(list(range(30)), max_tokens=10_000), GenerateContext())
    await stream.__anext__()
    assert engine.scheduler.kv.used_blocks > 0
    await stream.aclose()
    assert engine.scheduler.kv.used_blocks == 0 and not engine._active


async def test_cleanup_cancels_every_active_stream(engine_factory):
    engine = await engine_factory("--speedup-ratio", "1000")
    contexts = [GenerateContext() for _ in range(4)]

    async def consume(ctx: GenerateContext):
        return [i async for i in engine.generate(request([1, 2, 3], max_tokens=100_000), ctx)]

    tasks = [asyncio.create_task(consume(ctx)) for ctx in contexts]
    for _ in range(1000):  # let the streams get going (at most ~10 s)
        if engine.scheduler.steps >= 3:
            break
        await asyncio.sleep(0.01)
    assert engine.scheduler.steps >= 3
    await asyncio.wait_for(engine.cleanup(), 10)
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    for items in results:
        assert items[-1].finish_reason is FinishReason.CANCELLED
        streamed = sum(len(i.token_ids) for i in items)
        assert items[-1].completion_usage["completion_tokens"] == streamed
    await engine.cleanup()  # idempotent
    with pytest.raises(DynamoError):
        await collect(engine, request([1]))


async def test_many_concurrent_requests_on_a_tight_pool_finish_and_free(engine_factory):
    engine = await engine_factory(
        "--num-gpu-blocks",
        "10",
        "--block-size",
        "4",
        "--max-num-batched-tokens",
        "32",
        "--watermark",
        "0",
    )
    prompts = [[i] * (5 + i % 7) for i in range(24)]
    results = await asyncio.wait_for(
        asyncio.gather(*(collect(engine, request(p, max_tokens=9)) for p in prompts)), 30
    )
    for items in results:
        assert sum(len(i.token_ids) for i in items) == 9
    assert engine.scheduler.preemptions > 0
    assert engine.scheduler.kv.used_blocks == 0


async def test_metrics_register_on_fresh_registries(engine_factory):
    engine = await engine_factory("--num-gpu-blocks", "100")
    for _ in range(2):
        registry = CollectorRegistry()
        await engine.setup_metrics(registry)
        names = {f.name for f in registry.collect()}
        assert set(METRIC_NAMES) <= names
    await collect(engine, request(list(range(100)), max_tokens=2))
    await collect(engine, request(list(range(100)), max_tokens=2))
    assert registry.get_sample_value("mocker_kv_blocks_total") == 100
    assert registry.get_sample_value("mocker_kv_blocks_used") == 0
    assert registry.get_sample_value("mocker_steps") >= 4
    assert registry.get_sample_value("mocker_prefix_cache_hit_rate") > 0


async def test_setup_metrics_before_start_reads_zeros():
    engine = Engine(MockerSettings(device="none"))
    registry = CollectorRegistry()
    await engine.setup_metrics(registry)
    assert registry.get_sample_value("mocker_requests_running") == 0
    await engine.cleanup()

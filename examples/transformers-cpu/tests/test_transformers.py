"""The transformers engine does real inference, exactly as the request asks.

Everything runs on the CPU against a tiny random-weight Llama built from its config
(``backend_common.devstack.tinyllm``): no download. One engine serves the whole module.
The reference is transformers' own ``model.generate()`` (greedy) on the same weights.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch
from backend_common import EngineConfig, GenerateContext, LLMEngineOutput, PreprocessedRequest
from backend_common.devstack.tinyllm import write_tiny_causal_lm
from backend_common.errors import DynamoError
from backend_common.request_policy import check_request
from backend_common.testing import validated
from prometheus_client import CollectorRegistry
from transformers import AutoModelForCausalLM

from transformers_cpu.engine import TransformersCpuEngine
from transformers_cpu.hf import metrics

pytestmark = pytest.mark.asyncio(loop_scope="module")

BOS = 2049  # the tiny tokenizer's <s>
SRC = Path(__file__).resolve().parent.parent / "src"
BOUND_S = 60.0  # generous: a loaded 2-core CI machine


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_causal_lm(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def reference(model_path: Path) -> Any:
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    return model


def greedy_reference(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_path: Path) -> AsyncIterator[TransformersCpuEngine]:
    engine, _config = TransformersCpuEngine.from_args(
        ["--model-path", str(model_path), "--device", "cpu", "--max-num-seqs", "16"]
        + ["--cpu-threads", "1"]
    )
    await start(engine)
    try:
        yield engine
    finally:
        await engine.cleanup()


def request(prompt: list[int], **stop: Any) -> PreprocessedRequest:
    sampling = stop.pop("sampling", {"temperature": 0.0})
    extra = stop.pop("extra", {})
    return PreprocessedRequest.model_validate(
        {"token_ids": prompt, "stop_conditions": stop, "sampling_options": sampling, **extra}
    )


# What start() returned, per engine: run() admits each request against it as the worker does.
STARTED: dict[int, EngineConfig] = {}


async def start(engine: TransformersCpuEngine) -> EngineConfig:
    STARTED[id(engine)] = config = await engine.start(1)
    return config


async def run(
    engine: TransformersCpuEngine, req: PreprocessedRequest, ctx: GenerateContext | None = None
) -> tuple[list[int], LLMEngineOutput]:
    """The stream of ``req`` after the worker's own admission check (request_policy)."""
    check_request(req, STARTED[id(engine)])
    tokens: list[int] = []
    last: LLMEngineOutput | None = None
    async with asyncio.timeout(BOUND_S):
        async for item in validated(engine.generate(req, ctx or GenerateContext())):
            tokens += item.token_ids
            last = item
    assert last is not None
    return tokens, last


def prompts(n: int) -> list[list[int]]:
    return [[BOS] + [(37 * i + 11 * j) % 2000 + 3 for j in range(2 + 3 * i)] for i in range(n)]


async def test_concurrent_greedy_equals_model_generate(engine: Any, reference: Any) -> None:
    batch = prompts(6)
    results = await asyncio.gather(*(run(engine, request(p, max_tokens=20)) for p in batch))
    for prompt, (tokens, last) in zip(batch, results, strict=True):
        expected = greedy_reference(reference, prompt, 20)
        # A random model rarely says EOS; if it does, the engine must stop right there.
        if last.finish_reason == "eos":
            expected = expected[: len(tokens)]
        assert tokens == expected, f"prompt of {len(prompt)} tokens"
        assert last.completion_usage["completion_tokens"] == len(tokens)


async def test_usage_and_length_finish_are_exact(engine: Any) -> None:
    prompt = prompts(3)[2]
    tokens, last = await run(engine, request(prompt, max_tokens=7, ignore_eos=True))
    assert len(tokens) == 7
    assert last.finish_reason == "length"
    assert last.completion_usage["prompt_tokens"] == len(prompt)
    assert last.completion_usage["completion_tokens"] == 7


async def test_stop_token_ids_end_the_stream_with_stop(engine: Any, reference: Any) -> None:
    prompt = prompts(4)[3]
    expected = greedy_reference(reference, prompt, 12)
    stop_at = next(i for i in range(3, 12) if expected[i] not in expected[:i])
    stop_id = expected[stop_at]
    tokens, last = await run(
        engine, request(prompt, max_tokens=12, stop_token_ids_hidden=[stop_id])
    )
    assert tokens == expected[: stop_at + 1]
    assert last.finish_reason == "stop"


async def test_eos_min_tokens_and_ignore_eos(engine: Any, reference: Any) -> None:
    prompt = prompts(5)[4]
    expected = greedy_reference(reference, prompt, 12)
    eos_at = next(i for i in range(1, 12) if expected[i] not in expected[:i])
    eos = expected[eos_at]
    extra = {"eos_token_ids": [eos]}

    tokens, last = await run(engine, request(prompt, max_tokens=12, extra=extra))
    assert tokens == expected[: eos_at + 1] and last.finish_reason == "eos"

    tokens, last = await run(engine, request(prompt, max_tokens=12, ignore_eos=True, extra=extra))
    assert tokens == expected and last.finish_reason == "length"

    min_tokens = eos_at + 3
    tokens, last = await run(
        engine, request(prompt, max_tokens=12, min_tokens=min_tokens, extra=extra)
    )
    assert eos not in tokens[: min_tokens - 1]
    assert len(tokens) >= min_tokens
    assert tokens[:eos_at] == expected[:eos_at]


async def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(
    engine: Any, reference: Any
) -> None:
    prompt = prompts(2)[1]
    sampled = {"temperature": 1.5, "top_p": 0.9, "seed": 1234}
    a, _ = await run(engine, request(prompt, max_tokens=10, ignore_eos=True, sampling=sampled))
    b, _ = await run(engine, request(prompt, max_tokens=10, ignore_eos=True, sampling=sampled))
    assert a == b
    top1 = {"temperature": 0.8, "top_k": 1, "seed": 7}
    c, _ = await run(engine, request(prompt, max_tokens=10, ignore_eos=True, sampling=top1))
    assert c == greedy_reference(reference, prompt, 10)


async def test_repetition_penalty_matches_transformers(engine: Any, reference: Any) -> None:
    prompt = prompts(4)[3]
    sampling = {"temperature": 0.0, "repetition_penalty": 1.5}
    tokens, _ = await run(
        engine, request(prompt, max_tokens=12, ignore_eos=True, sampling=sampling)
    )
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            repetition_penalty=1.5,
            pad_token_id=0,
        )
    assert tokens == out[0, len(prompt) :].tolist()


async def test_cancellation_leaves_the_batch_and_frees_kv(engine: Any) -> None:
    core = engine.core
    baseline = core.stats.kv_used_blocks
    ctx = GenerateContext()
    stream = engine.generate(request(prompts(3)[2], max_tokens=1500, ignore_eos=True), ctx)
    seen = 0
    final: LLMEngineOutput | None = None
    async with asyncio.timeout(BOUND_S):
        async for item in validated(stream):
            seen += len(item.token_ids)
            if seen >= 5 and not ctx.is_stopped():
                assert core.stats.kv_used_blocks > baseline
                ctx.stop_generating()
            final = item
    assert final is not None and final.finish_reason == "cancelled"
    assert final.completion_usage["completion_tokens"] == seen
    deadline = time.monotonic() + BOUND_S
    while core.stats.kv_used_blocks != baseline or core.stats.running:
        assert time.monotonic() < deadline, f"KV not freed: {core.stats}"
        await asyncio.sleep(0.02)


async def test_dropped_stream_frees_kv(engine: Any) -> None:
    core = engine.core
    baseline = core.stats.kv_used_blocks
    req = request(prompts(2)[1], max_tokens=1500, ignore_eos=True)
    stream = engine.generate(req, GenerateContext())
    async with asyncio.timeout(BOUND_S):
        await stream.__anext__()
        await stream.__anext__()
    await stream.aclose()  # the consumer went away without a stop
    deadline = time.monotonic() + BOUND_S
    while core.stats.kv_used_blocks != baseline or core.stats.running:
        assert time.monotonic() < deadline, f"KV not freed: {core.stats}"
        await asyncio.sleep(0.02)


async def test_bad_input_is_a_typed_invalid_argument(engine: Any) -> None:
    context = engine.info.context_length
    cases = [
        request([BOS] * context, max_tokens=1),
        request([5000], max_tokens=1),
        request([BOS, 5], max_tokens=1, sampling={"n": 2}),
        request([BOS, 5], max_tokens=1, sampling={"temperature": -1.0}),
        request([BOS, 5], max_tokens=1, sampling={"top_p": 0.0}),
        request([BOS, 5], max_tokens=1, extra={"output_options": {"logprobs": 2}}),
    ]
    for req in cases:
        with pytest.raises(DynamoError) as info:
            await run(engine, req)
        assert info.value.is_invalid_argument, info.value
    tokens, last = await run(engine, request([BOS, 5], max_tokens=2))  # still serving
    assert len(tokens) <= 2


async def test_max_tokens_past_the_context_is_clamped(model_path: Path) -> None:
    engine, _ = TransformersCpuEngine.from_args(
        ["--model-path", str(model_path), "--device", "cpu", "--context-length", "24"]
        + ["--cpu-threads", "1"]
    )
    await start(engine)
    try:
        prompt = prompts(3)[2]  # 9 tokens
        tokens, last = await run(engine, request(prompt, max_tokens=1000, ignore_eos=True))
        assert len(tokens) == 24 - len(prompt)
        assert last.finish_reason == "length"
    finally:
        await engine.cleanup()
        await engine.cleanup()  # once: the second call does nothing


async def test_metrics_and_engine_config(engine: Any) -> None:
    registry = CollectorRegistry()
    await engine.setup_metrics(registry)
    await run(engine, request([BOS, 9, 8], max_tokens=3))
    names = {m.name for m in registry.collect()}
    for name in metrics.METRIC_NAMES:
        assert name in names
    assert registry.get_sample_value("hf_kv_blocks_total") == engine.info.kv_total_blocks > 0
    # Three tokens take three steps; the last step is observed just after its token left.
    deadline = time.monotonic() + BOUND_S
    while (registry.get_sample_value("hf_step_seconds_count") or 0) < 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    payload = await engine.health_check_payload()
    tokens, last = await run(engine, PreprocessedRequest.model_validate(payload))
    assert len(tokens) == 1 and last.finish_reason == "length"


def _bad_model_dir(tmp_path: Path) -> Path:
    bad = tmp_path / "encoder"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    return bad


@pytest.mark.parametrize("kind", ["missing", "not-causal"])
async def test_bad_model_dir_is_one_line_and_a_non_zero_exit(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "nowhere" if kind == "missing" else _bad_model_dir(tmp_path)
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "transformers_cpu", "--model-path", str(path)]
        + ["--discovery-backend", "file"],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PYTHONPATH": str(SRC),
            "PATH": "/usr/bin:/bin",
            "HF_HUB_OFFLINE": "1",
            "DYN_FILE_KV": str(tmp_path / "kv"),
        },
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0], proc.stderr
    assert not any((tmp_path / "kv").rglob("*.json")) if (tmp_path / "kv").exists() else True

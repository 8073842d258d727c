"""Disaggregated prefill/decode: registration, the role contract, and serving through the FE.

* Registration: ``--disaggregation-mode prefill|decode`` publishes the ``worker_type``,
  ``model_type`` and ``needs`` Dynamo 1.6.1's own workers publish (captured from the real
  sample backend: prefill -> ``Prefill`` / ``prefill`` / ``[["decode"]]``; decode -> the
  endpoint types / ``decode`` / ``[["prefill"]]``).
* The mocker in each role: a prefill worker ends after at most one token with its handoff
  in ``disaggregated_params``; a decode worker refuses a request without
  ``prefill_result`` with a typed InvalidArgument, and waits the simulated KV transfer
  time when it has one.
* End to end: the real frontend, one prefill mocker and one decode mocker serve chat; the
  frontend's prefill router sends each request to the prefill worker first and forwards
  its handoff to the decode worker (both count the handoff on ``/metrics``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import urllib.request

import aiohttp
import pytest
from conftest import REPO, RUNTIME_SRC, Stack, free_port

from backend_common import GenerateContext, PreprocessedRequest
from backend_common.config import EngineConfig
from backend_common.errors import DynamoError
from backend_common.runtime.modelcard import build_model_card

MOCKER_SRC = REPO / "examples" / "mocker-cuda" / "src"
MOCKER_ARGS = ("--device", "none", "--speedup-ratio", "100", "--disable-kv-routing")


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.split("{", 1)[0].split(" ", 1)[0] == name
    )


def mocker_engine(mode: str, **settings):
    if str(MOCKER_SRC) not in sys.path:
        sys.path.insert(0, str(MOCKER_SRC))
    from mocker_cuda.engine import MockerCudaEngine
    from mocker_cuda.mocker.args import MockerSettings

    base = {"device": "none", "speedup_ratio": 0.0}
    return MockerCudaEngine(MockerSettings(**{**base, **settings}), model="m", mode=mode)


async def collect(engine, request: dict) -> list:
    ctx = GenerateContext()
    return [item async for item in engine.generate(PreprocessedRequest.from_dict(request), ctx)]


# -- registration ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "model_type", "worker_type", "needs"),
    [
        ("prefill", "Prefill", "prefill", [["decode"]]),
        ("decode", "Chat | Completions", "decode", [["prefill"]]),
        ("agg", "Chat | Completions", "aggregated", []),
    ],
)
def test_card_registers_the_role_like_dynamo(
    tiny_model, mode: str, model_type: str, worker_type: str, needs: list
) -> None:
    from backend_common.args import add_common_args, worker_config_from_args

    parser = add_common_args(argparse.ArgumentParser())
    args = parser.parse_args(["--model-path", str(tiny_model), "--disaggregation-mode", mode])
    config = worker_config_from_args(args)
    card = build_model_card(config, EngineConfig(model="m"), base_url=None).card
    assert (card["model_type"], card["worker_type"], card["needs"]) == (
        model_type,
        worker_type,
        needs,
    )


# -- the mocker in each role -------------------------------------------------------------------
async def test_prefill_returns_handoff_after_at_most_one_token() -> None:
    engine = mocker_engine("prefill")
    await engine.start(1)
    try:
        items = await collect(
            engine, {"token_ids": [5, 6, 7, 8], "stop_conditions": {"max_tokens": 50}}
        )
    finally:
        await engine.cleanup()
    assert sum(len(i.token_ids or []) for i in items) <= 1
    final = items[-1]
    assert final.finish_reason is not None
    params = final.disaggregated_params
    assert isinstance(params, dict) and params["mocker_handle"]
    assert params["completed_tokens"] == final.token_ids
    assert all(i.disaggregated_params is None for i in items[:-1])


async def test_decode_requires_prefill_result_and_simulates_the_transfer() -> None:
    engine = mocker_engine("decode", kv_transfer_time_ms=150.0, speedup_ratio=1.0)
    await engine.start(1)
    try:
        with pytest.raises(DynamoError) as info:
            await collect(engine, {"token_ids": [5, 6], "stop_conditions": {"max_tokens": 2}})
        assert info.value.is_invalid_argument
        assert "prefill_result" in info.value.message

        handoff = {"disaggregated_params": {"mocker_handle": "h", "completed_tokens": [1001]}}
        started = time.monotonic()
        items = await collect(
            engine,
            {
                "token_ids": [5, 6],
                "stop_conditions": {"max_tokens": 3},
                "prefill_result": handoff,
                "bootstrap_info": {
                    "bootstrap_host": "127.0.0.1",
                    "bootstrap_port": 1,
                    "bootstrap_room": 7,
                },
            },
        )
        waited = time.monotonic() - started
    finally:
        await engine.cleanup()
    assert items[-1].finish_reason is not None
    assert sum(len(i.token_ids or []) for i in items) == 3
    assert all(i.disaggregated_params is None for i in items)
    # The simulated KV transfer (150 ms at speedup 1) happened before decoding.
    assert waited >= 0.15
    assert engine.handoffs == 1


async def test_decode_probe_needs_no_prefill_result() -> None:
    engine = mocker_engine("decode")
    await engine.start(1)
    try:
        payload = await engine.health_check_payload()
        items = await collect(engine, payload)
    finally:
        await engine.cleanup()
    assert items[-1].finish_reason is not None
    assert engine.handoffs == 0


# -- end to end -------------------------------------------------------------------------------
@pytest.mark.e2e
async def test_prefill_and_decode_workers_serve_chat_through_the_frontend(make_stack) -> None:
    from backend_common.devstack.openai import chat

    stack: Stack = make_stack("file", "tcp")
    model = "tiny-disagg"
    env = {"PYTHONPATH": os.pathsep.join([str(MOCKER_SRC), str(RUNTIME_SRC), str(REPO)])}
    prefill_port, decode_port = free_port(), free_port()
    prefill = stack.start_worker(
        model,
        *MOCKER_ARGS,
        "--disaggregation-mode",
        "prefill",
        "--component",
        "prefill",
        module="mocker_cuda",
        system_port=prefill_port,
        env=env,
    )
    decode = stack.start_worker(
        model,
        *MOCKER_ARGS,
        "--disaggregation-mode",
        "decode",
        "--kv-transfer-time-ms",
        "20",
        module="mocker_cuda",
        system_port=decode_port,
        env=env,
    )
    stack.frontend.wait_for_model(model, timeout=60, watch=[prefill, decode])
    # The decode worker makes the model visible; the prefill router activates on its own
    # discovery event. Wait until the frontend logged that it found the prefill worker.
    deadline = time.monotonic() + 30
    while "Prefill worker detected" not in stack.frontend.log_text():
        assert time.monotonic() < deadline, stack.frontend.log_tail()
        await asyncio.sleep(0.1)

    async with aiohttp.ClientSession() as session:
        for n in range(3):
            resp = await chat(
                session, stack.frontend.base_url, model, "w1 w2 w3", max_tokens=5, stream=n == 1
            )
            assert resp.status == 200, resp.error
            assert resp.usage["completion_tokens"] == 5, resp.usage
            assert resp.text.strip()

    # Every request went through the prefill worker, whose handoff reached the decode worker.
    assert metric(prefill_port, "dynamo_component_requests_total") == 3
    assert metric(prefill_port, "mocker_disagg_handoffs") == 3
    assert metric(decode_port, "dynamo_component_requests_total") == 3
    assert metric(decode_port, "mocker_disagg_handoffs") == 3

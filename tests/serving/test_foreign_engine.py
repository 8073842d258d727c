"""A foreign-shaped engine (``tests/foreign_engine.py``) behind the real Dynamo 1.6.1 frontend.

* An engine whose own parser defines vLLM's and SGLang's flag names starts with ``run()``
  and serves; the worker reads the served name and the parsers from the engine's flags.
* Every ``DynamoError`` category raised by ``generate`` before its first item and mid-stream:
  what the frontend returns (HTTP status, SSE error event, whether ``--migration-limit``
  retries it on another worker). The observed table is ``backend_common/docs/errors.md``'s;
  the test fails when the two differ (``UPDATE_ERROR_TABLE=1`` rewrites the table instead).
"""

from __future__ import annotations

import asyncio
import os
import re

import aiohttp
import pytest
from conftest import REPO, Stack, free_port
from foreign_engine import CATEGORIES, ERROR_BASE

from backend_common.devstack.openai import ChatResult, chat, completion

pytestmark = pytest.mark.e2e

MODULE = "tests.foreign_engine"
DOC = REPO / "template" / "src" / "backend_common" / "docs" / "errors.md"
INHIBIT_S = 1
RECOVERY_S = 15.0
BEGIN, END = "<!-- error-table:begin -->", "<!-- error-table:end -->"


def events(proc, kind: str) -> list[str]:
    text = proc.log_path.read_text(errors="replace")
    return re.findall(rf"^EVENT {kind} (.*)$", text, flags=re.MULTILINE)


async def test_engine_with_vllm_and_sglang_flag_names_serves(make_stack) -> None:
    stack: Stack = make_stack("file", "tcp")
    port = free_port()
    proc = stack.start_worker(
        "foreign-internal",
        "--served-model-name",
        "foreign-public",
        "foreign-alias",
        "--tool-call-parser",
        "hermes",
        "--reasoning-parser",
        "qwen3",
        "--host",
        "0.0.0.0",
        "--port",
        "31000",
        "--disable-kv-routing",
        module=MODULE,
        system_port=port,
    )
    stack.frontend.wait_for_model("foreign-public", timeout=60, watch=[proc])
    (config,) = events(proc, "config")
    assert f"model_path={stack.model_dir} " in config
    assert "served=foreign-public " in config
    assert "tool_call_parser=hermes reasoning_parser=qwen3 engine_port=31000" in config
    async with aiohttp.ClientSession() as session:
        result = await chat(
            session, stack.frontend.base_url, "foreign-public", "w5", max_tokens=4, stream=False
        )
    assert result.status == 200, result.error
    assert result.text.split() == ["w1", "w2", "w3", "w4"]
    # The engine's counter lives in the global prometheus_client.REGISTRY; the worker's
    # /metrics serves it once, with Dynamo's labels.
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        text = await resp.text()
    lines = [ln for ln in text.splitlines() if ln.startswith("foreign_engine_generate_total{")]
    assert len(lines) == 1, text
    assert 'dynamo_namespace="dynamo"' in lines[0] and 'model_name="foreign-public"' in lines[0]
    assert re.search(r'worker_id="[0-9a-f]+"', lines[0]) and lines[0].endswith(" 1.0")


def _cell(result: ChatResult, *, stream: bool) -> str:
    """What the client saw, in one table cell."""
    if result.status != 200:
        message = str((result.error or {}).get("message", ""))[:60]
        return f"HTTP {result.status}: `{message}`"
    if result.error is not None:
        code = result.error.get("code")
        words = len(result.text.split())
        return f"200, {words} tokens, then SSE error (code {code})"
    if stream:
        return f"200, {len(result.text.split())} tokens, no error" + (", [DONE]" * result.done)
    return f"200, {len(result.text.split())} tokens, finish={result.finish_reason}"


async def _observe(stack: Stack, model: str, category_index: int, *, stream: bool) -> ChatResult:
    prompt = f"w1 w{ERROR_BASE + category_index}"
    async with aiohttp.ClientSession() as session:
        return await completion(
            session, stack.frontend.base_url, model, prompt, max_tokens=6, stream=stream
        )


async def _next_request(stack: Stack, model: str) -> str:
    """The status of a good request right after an error, then wait until the model serves."""
    first = await _observe(stack, model, len(CATEGORIES), stream=False)
    deadline = asyncio.get_running_loop().time() + RECOVERY_S
    result = first
    while result.status != 200 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)
        result = await _observe(stack, model, len(CATEGORIES), stream=False)
    assert result.status == 200 and len(result.text.split()) == 6, (model, result)
    return "" if first.status == 200 else f"; next request: HTTP {first.status}"


async def test_error_categories_through_the_frontend(make_stack) -> None:
    # The frontend takes a worker out of rotation after some errors; 1 s keeps the test short.
    env = {"DYN_RUNTIME_INHIBITED_DURATION_SECS": str(INHIBIT_S)}
    plain: Stack = make_stack("file", "tcp", extra_env=env)
    first = plain.start_worker(
        "err-first", "--fail-after", "0", "--disable-kv-routing", module=MODULE
    )
    mid = plain.start_worker("err-mid", "--fail-after", "2", "--disable-kv-routing", module=MODULE)
    # Two workers behind a frontend that migrates: a retried stream lands on either.
    migrating: Stack = make_stack(
        "file", "tcp", extra_args=["--migration-limit", "1"], extra_env=env
    )
    pair = [
        migrating.start_worker(
            "err-mig", "--fail-after", "2", "--disable-kv-routing", module=MODULE
        )
        for _ in range(2)
    ]
    plain.frontend.wait_for_model("err-first", timeout=60, watch=[first])
    plain.frontend.wait_for_model("err-mid", timeout=60, watch=[mid])
    migrating.frontend.wait_for_model("err-mig", timeout=60, watch=pair)

    rows = []
    for i, category in enumerate(CATEGORIES):
        cells = []
        for stack, model in ((plain, "err-first"), (plain, "err-mid"), (migrating, "err-mig")):
            for stream in (True, False):
                if stack is migrating:
                    # Let an earlier inhibition expire: both workers take part in each retry.
                    await asyncio.sleep(INHIBIT_S + 0.3)
                result = await _observe(stack, model, i, stream=stream)
                cells.append(_cell(result, stream=stream) + await _next_request(stack, model))
        rows.append(f"| `{category.value}` | " + " | ".join(cells) + " |")
    raised = events(first, "raise") + events(mid, "raise")
    for category in CATEGORIES:  # every category was raised by the engine, nothing else
        assert raised.count(category.value) == 4, (category, raised)

    table = "\n".join(
        [
            "| category | before the first token, streaming | before the first token, "
            "non-streaming | mid-stream, streaming | mid-stream, non-streaming | "
            "mid-stream, `--migration-limit 1`, streaming | mid-stream, "
            "`--migration-limit 1`, non-streaming |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    _check_doc(table)


def _check_doc(table: str) -> None:
    text = DOC.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    if os.environ.get("UPDATE_ERROR_TABLE") == "1":
        DOC.write_text(text[:start] + "\n" + table + "\n" + text[end:])
        return
    assert text[start:end].strip() == table, (
        "backend_common/docs/errors.md differs from what the frontend returned; "
        "rerun with UPDATE_ERROR_TABLE=1 and review the diff:\n" + table
    )


def test_doc_table_has_every_category() -> None:
    text = DOC.read_text()
    body = text[text.index(BEGIN) : text.index(END)]
    for category in CATEGORIES:
        assert f"| `{category.value}` |" in body

"""The vLLM engine through the real Dynamo 1.6.1 frontend, against vLLM's offline ``LLM``.

Everything runs on the CPU against a tiny random-weight Llama with a byte-level tokenizer
(``backend_common.devstack.tinyllm.write_tiny_llama``, head size 64): no download. Each
``AsyncLLM`` start costs tens of seconds here, so the stacks are shared per module:

* ``reference``: vLLM's offline ``LLM.generate`` on the same model in a subprocess (greedy
  tokens and logprobs of ``PROMPTS``), once;
* ``stack``: the frontend and one worker; parity, guided decoding, logprobs, stop
  conditions, bad input, cancellation, metrics, and last the SIGTERM drain;
* ``kv_stacks``: two frontends in ``--router-mode kv``, each with two workers: one pair
  publishes vLLM's KV events (shared-prefix requests stay on the worker holding the
  prefix), the control pair does not (they spread); then an engine-core SIGKILL on a
  control worker (typed errors, exit ``ENGINE_DEAD_EXIT_CODE``, out of discovery).

Prompts are token ids (``/v1/completions``) so both sides see exactly the same ids; the
served ids are read with ``nvext.extra_fields: ["completion_token_ids"]``.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import psutil
import pytest
from backend_common.devstack.frontend import (
    Frontend,
    find_frontend_python,
    hermetic_env,
    worker_env,
)
from backend_common.devstack.openai import ChatResult, chat, completion
from backend_common.devstack.services import ManagedProcess, free_port
from backend_common.devstack.tinyllm import write_tiny_llama

from vllm_cpu_backend.args import DEFAULT_REQUEST_PLANE
from vllm_cpu_backend.vllm_engine.engine import ENGINE_DEAD_EXIT_CODE

pytestmark = [
    pytest.mark.e2e,
    # A test that first needs a stack or the reference waits for vLLM engine starts.
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        find_frontend_python() is None,
        reason="the real Dynamo frontend is not installed: run `make e2e` "
        "(or set DYNAMO_FRONTEND_PYTHON to its venv's python)",
    ),
]

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
MODEL = "tiny"
CONTEXT = 512
READY_TIMEOUT_S = 240.0  # an AsyncLLM start on a loaded 2-core machine
VLLM_FLAGS = (
    "--enforce-eager",
    "--dtype",
    "float32",
    "--max-model-len",
    str(CONTEXT),
    # Random weights prefer whitespace: without this a JSON object never closes.
    "--structured-outputs-config",
    '{"backend": "xgrammar", "disable_any_whitespace": true}',
)
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
MAX_TOKENS = 16
BOS = 1
# Token-id prompts of different lengths (ids of the byte-level vocabulary, below 256).
PROMPTS = [[BOS] + [(31 * i + 7 * j) % 200 + 40 for j in range(3 + 9 * i)] for i in range(8)]
LOGPROBS = 3
LOGPROB_TOLERANCE = 1e-3  # float32 on both sides; batch shapes differ (server vs offline)
ENGINE_DEATH_EXIT_BOUND_S = 20.0
"""SIGKILL of the engine core to the worker's exit (measured: README, "vLLM engine")."""
CANCEL_RECOVERY_S = 10.0

REFERENCE_SCRIPT = """
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    model, prompts_file, out_file, max_tokens, logprobs = sys.argv[1:6]
    prompts = json.load(open(prompts_file))
    llm = LLM(model=model, enforce_eager=True, dtype="float32", max_model_len=int(sys.argv[6]))
    params = SamplingParams(temperature=0.0, max_tokens=int(max_tokens),
                            logprobs=int(logprobs), detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    result = []
    for out in outs:
        c = out.outputs[0]
        result.append({"tokens": list(c.token_ids),
                       "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]})
    json.dump(result, open(out_file, "w"))
"""


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("model"), context_length=CONTEXT)


@pytest.fixture(scope="module")
def reference(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """vLLM's offline greedy tokens and logprobs for ``PROMPTS`` (one ``LLM`` in a subprocess)."""
    work = tmp_path_factory.mktemp("reference")
    (work / "prompts.json").write_text(json.dumps(PROMPTS))
    (work / "reference.py").write_text(REFERENCE_SCRIPT)
    argv = [sys.executable, str(work / "reference.py"), str(model_path)]
    argv += [str(work / "prompts.json"), str(work / "out.json"), str(MAX_TOKENS), str(LOGPROBS)]
    out = subprocess.run(
        [*argv, str(CONTEXT)],
        env=hermetic_env(VLLM_ENV),
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT_S,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads((work / "out.json").read_text())


@dataclass
class Stack:
    frontend: Frontend
    workers: list[ManagedProcess]
    ports: list[int]

    def logs(self) -> str:
        tails = [f"--- frontend ---\n{self.frontend.log_tail()}"]
        tails += [f"--- worker {n} ---\n{w.log_tail()}" for n, w in enumerate(self.workers)]
        return "\n".join(tails)


def start_stack(
    tmp: Path,
    model_path: Path,
    workers: int,
    *,
    router_mode: str | None,
    worker_args: tuple[str, ...] = (),
) -> Iterator[Stack]:
    frontend = Frontend(
        workdir=tmp / "frontend",
        discovery_backend="file",
        request_plane=DEFAULT_REQUEST_PLANE,
        router_mode=router_mode,
    )
    procs: list[ManagedProcess] = []
    ports: list[int] = []
    for n in range(workers):
        ports.append(free_port())
        env = worker_env(
            discovery_backend="file",
            file_kv=frontend.file_kv,
            request_plane=DEFAULT_REQUEST_PLANE,
            system_port=ports[-1],
        )
        procs.append(
            ManagedProcess(
                [sys.executable, "-m", "vllm_cpu_backend", "--model", str(model_path)]
                + ["--served-model-name", MODEL, *VLLM_FLAGS, *worker_args],
                env=hermetic_env({**env, **VLLM_ENV, "PYTHONPATH": str(SRC)}),
                log_path=tmp / f"worker{n}.log",
            )
        )
    try:
        frontend.start()
        for proc in procs:
            proc.start()
        stack = Stack(frontend, procs, ports)
        try:
            frontend.wait_for_model(MODEL, timeout=READY_TIMEOUT_S, watch=procs)
            # The model shows once the first worker registered; wait for all of them.
            for port in ports:
                wait_for(lambda p=port: _health_ok(p), READY_TIMEOUT_S, stack)
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}\n{stack.logs()}") from exc
        yield stack
    finally:
        for proc in procs:
            proc.terminate(timeout=30)
        frontend.stop()


def _health_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def wait_for(check: Any, timeout: float, stack: Stack) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.2)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def metric(text: str, name: str) -> float:
    """Sum of every sample of ``name`` in a Prometheus text page."""
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.split("{", 1)[0].split(" ", 1)[0] == name
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Stack]:
    yield from start_stack(tmp_path_factory.mktemp("stack"), model_path, 1, router_mode=None)


async def complete_ids(
    stack: Stack, prompt: list[int], *, max_tokens: int = MAX_TOKENS, **extra: Any
) -> tuple[ChatResult, list[int]]:
    """A greedy, non-streaming completion of token ids; the result and the served ids."""
    body = {
        "prompt": prompt,
        "temperature": 0.0,
        "nvext": {"extra_fields": ["completion_token_ids"]},
        **extra,
    }
    async with aiohttp.ClientSession() as session:
        result = await completion(
            session,
            stack.frontend.base_url,
            MODEL,
            "",
            max_tokens=max_tokens,
            stream=False,
            extra=body,
        )
    ids: list[int] = []
    if result.ok and result.body is not None:
        ids = list((result.body.get("nvext") or {}).get("completion_token_ids") or [])
    return result, ids


# -- parity -------------------------------------------------------------------------------
async def test_greedy_one_at_a_time_equals_offline_vllm(
    stack: Stack, reference: list[dict[str, Any]]
) -> None:
    for prompt, expected in zip(PROMPTS, reference, strict=True):
        result, ids = await complete_ids(stack, prompt)
        assert result.ok, f"{result.status} {result.error}\n{stack.logs()}"
        assert ids == expected["tokens"], f"prompt of {len(prompt)} tokens"
        assert result.usage is not None and result.usage["completion_tokens"] == len(ids)


async def test_greedy_eight_concurrent_prompts_agree_with_offline_vllm(
    stack: Stack, reference: list[dict[str, Any]]
) -> None:
    results = await asyncio.gather(*(complete_ids(stack, p) for p in PROMPTS))
    agree = sum(ids == ref["tokens"] for (_r, ids), ref in zip(results, reference, strict=True))
    for result, _ids in results:
        assert result.ok, f"{result.status} {result.error}"
    # Batched float32 kernels may flip a near-tie; the README reports the measured count.
    print(f"concurrent greedy parity: {agree}/{len(PROMPTS)} prompts identical")
    assert agree >= len(PROMPTS) - 1, f"only {agree}/{len(PROMPTS)} agree"


async def test_logprobs_equal_offline_vllm(stack: Stack, reference: list[dict[str, Any]]) -> None:
    prompt, expected = PROMPTS[2], reference[2]
    result, ids = await complete_ids(stack, prompt, logprobs=LOGPROBS)
    assert result.ok, f"{result.status} {result.error}\n{stack.logs()}"
    assert ids == expected["tokens"]
    assert result.body is not None
    served = result.body["choices"][0]["logprobs"]
    values = served["token_logprobs"]
    assert len(values) == len(expected["logprobs"])
    for got, want in zip(values, expected["logprobs"], strict=True):
        assert abs(got - want) <= LOGPROB_TOLERANCE, (got, want)
    # OpenAI's top_logprobs are keyed by token text (byte-level pieces may share one), so
    # fewer keys than LOGPROBS can come back; the sampled (greedy) token is the most likely.
    for got, top in zip(values, served["top_logprobs"], strict=True):
        assert top and max(top.values()) <= got + LOGPROB_TOLERANCE, (got, top)


# -- guided decoding ------------------------------------------------------------------------
async def guided_chat(stack: Stack, extra: dict[str, Any], max_tokens: int = 48) -> ChatResult:
    async with aiohttp.ClientSession() as session:
        return await chat(
            session,
            stack.frontend.base_url,
            MODEL,
            "write it",
            max_tokens=max_tokens,
            stream=False,
            extra={"temperature": 0.0, **extra},
        )


async def test_guided_regex(stack: Stack) -> None:
    pattern = "[0-9]{3}-[a-z]{2}"
    result = await guided_chat(stack, {"guided_regex": pattern})
    assert result.ok, f"{result.status} {result.error}\n{stack.logs()}"
    assert re.fullmatch(pattern, result.text), result.text
    assert result.finish_reason == "stop"


async def test_guided_choice(stack: Stack) -> None:
    choices = ["red", "green", "blue"]
    result = await guided_chat(stack, {"guided_choice": choices})
    assert result.ok, f"{result.status} {result.error}\n{stack.logs()}"
    assert result.text in choices
    assert result.finish_reason == "stop"


async def test_guided_json_schema_validates_and_finishes(stack: Stack) -> None:
    schema = {
        "type": "object",
        # Bounded fields only: random weights would write digits of an integer forever.
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "ok": {"type": "boolean"},
            "color": {"enum": ["red", "green", "blue"]},
        },
        "required": ["name", "ok", "color"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    result = await guided_chat(stack, {"response_format": fmt}, max_tokens=120)
    assert result.ok, f"{result.status} {result.error}\n{stack.logs()}"
    assert result.finish_reason == "stop", result.text
    jsonschema.validate(json.loads(result.text), schema)


# -- stop conditions -----------------------------------------------------------------------
async def test_max_tokens_with_ignore_eos_is_exact(stack: Stack) -> None:
    result, ids = await complete_ids(stack, PROMPTS[1], max_tokens=7, ignore_eos=True)
    assert result.ok, f"{result.status} {result.error}"
    assert len(ids) == 7 and result.finish_reason == "length"


async def test_stop_token_id_ends_the_request(
    stack: Stack, reference: list[dict[str, Any]]
) -> None:
    expected = reference[3]["tokens"]
    stop_at = next(i for i, t in enumerate(expected) if t not in expected[:i] and i >= 2)
    result, ids = await complete_ids(stack, PROMPTS[3], stop_token_ids=[expected[stop_at]])
    assert result.ok, f"{result.status} {result.error}"
    assert ids[:stop_at] == expected[:stop_at]
    assert len(ids) <= stop_at + 1 and result.finish_reason == "stop", (ids, expected)


async def test_max_tokens_past_the_context_is_clamped(stack: Stack) -> None:
    prompt = [BOS] + [50] * (CONTEXT - 4)
    result, ids = await complete_ids(stack, prompt, max_tokens=100, ignore_eos=True)
    assert result.ok, f"{result.status} {result.error}"
    assert len(ids) == 3 and result.finish_reason == "length"


# -- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra",
    [
        {"prompt": [BOS] + [50] * CONTEXT},
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
            }
        },
        {"n": 2},
        {"use_beam_search": True},
        {"top_p": 5.0},
        {"temperature": -1.0},
        {"logprobs": 1000},
    ],
    ids=[
        "past-context",
        "invalid-schema",
        "n-2",
        "beam-search",
        "top-p-5",
        "temperature-neg",
        "logprobs-1000",
    ],
)
async def test_bad_input_is_400_and_the_worker_keeps_serving(
    stack: Stack, extra: dict[str, Any]
) -> None:
    fields = dict(extra)
    result, _ids = await complete_ids(stack, fields.pop("prompt", PROMPTS[0]), **fields)
    assert result.status == 400, f"{result.status} {result.error}\n{stack.logs()}"
    again, ids = await complete_ids(stack, PROMPTS[0])
    assert again.ok and ids, f"{again.status} {again.error}"


# -- cancellation and metrics ------------------------------------------------------------------
async def test_disconnect_aborts_the_request_in_vllm(stack: Stack) -> None:
    port = stack.ports[0]
    baseline = metric(scrape(port), "vllm:kv_cache_usage_perc")
    url = stack.frontend.base_url + "/v1/completions"
    body = {
        "model": MODEL,
        "prompt": PROMPTS[4],
        "max_tokens": CONTEXT - len(PROMPTS[4]) - 1,
        "ignore_eos": True,
        "stream": True,
    }
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        assert resp.status == 200
        chunks = 0
        async for _line in resp.content:
            chunks += 1
            if chunks >= 6:
                break
        running = metric(scrape(port), "vllm:num_requests_running")
        assert running == 1, scrape(port)
    # The client is gone: vLLM aborts the request, frees its blocks.
    deadline = time.monotonic() + CANCEL_RECOVERY_S
    while True:
        text = scrape(port)
        if (
            metric(text, "vllm:num_requests_running") == 0
            and metric(text, "vllm:kv_cache_usage_perc") == baseline
        ):
            break
        assert time.monotonic() < deadline, text
        await asyncio.sleep(0.2)
    assert metric(text, "vllm:request_success_total") >= 1


def test_worker_metrics_carry_vllm_and_kv_gauges(stack: Stack) -> None:
    text = scrape(stack.ports[0])
    assert metric(text, "vllm:prompt_tokens_total") > 0, text[:2000]
    assert "dynamo_component_total_blocks" in text
    assert metric(text, "dynamo_component_total_blocks") > 0
    assert metric(text, "dynamo_component_requests_total") > 0


# -- SIGTERM drain (last on the shared stack) ----------------------------------------------------
async def test_sigterm_drains_in_flight_streams(stack: Stack) -> None:
    worker = stack.workers[0]
    tokens = 120
    async with aiohttp.ClientSession() as session:
        request = asyncio.ensure_future(
            completion(
                session,
                stack.frontend.base_url,
                MODEL,
                "",
                max_tokens=tokens,
                stream=True,
                extra={"prompt": PROMPTS[5], "ignore_eos": True, "temperature": 0.0},
            )
        )
        await asyncio.sleep(1.0)
        worker.send_signal(signal.SIGTERM)
        result = await request
    assert result.ok, f"{result.status} {result.error}\n{stack.logs()}"
    assert result.finish_reason == "length"
    assert result.usage is not None and result.usage["completion_tokens"] == tokens
    assert await asyncio.to_thread(worker.wait, 60) == 0, stack.logs()
    stack.frontend.wait_model_gone(MODEL, timeout=30)


# -- KV routing, control, engine-core death ----------------------------------------------------
@pytest.fixture(scope="module")
def kv_stack(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Stack]:
    yield from start_stack(tmp_path_factory.mktemp("kv"), model_path, 2, router_mode="kv")


@pytest.fixture(scope="module")
def control_stack(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Stack]:
    # The same router, workers that publish no KV events.
    yield from start_stack(
        tmp_path_factory.mktemp("control"),
        model_path,
        2,
        router_mode="kv",
        worker_args=("--disable-kv-routing",),
    )


def served_by(stack: Stack) -> list[float]:
    return [metric(scrape(p), "dynamo_component_requests_total") for p in stack.ports]


async def route_shared_prefix(stack: Stack, repeats: int) -> list[int]:
    """Send ``repeats`` requests sharing a 2-block prefix; the worker index of each."""
    prefix = [BOS] + [(13 * j) % 200 + 40 for j in range(2 * 128)]
    where: list[int] = []
    for n in range(repeats):
        before = served_by(stack)
        result, _ids = await complete_ids(stack, prefix + [60 + n, 61 + n], max_tokens=2)
        assert result.ok, f"{result.status} {result.error}\n{stack.logs()}"
        after = served_by(stack)
        where.append(next(i for i, (a, b) in enumerate(zip(after, before, strict=True)) if a > b))
        await asyncio.sleep(0.5)  # the KV events of this request reach the router
    return where


async def test_kv_router_sends_a_shared_prefix_to_the_worker_holding_it(kv_stack: Stack) -> None:
    where = await route_shared_prefix(kv_stack, 8)
    assert len(set(where[1:])) == 1 and where[1] == where[0], where


async def test_control_without_kv_events_spreads(control_stack: Stack) -> None:
    # 12 requests over two equally loaded workers all on one: chance 2 * 0.5**12.
    where = await route_shared_prefix(control_stack, 12)
    assert len(set(where)) == 2, where


async def test_engine_core_death_fails_streams_and_the_worker_exits(control_stack: Stack) -> None:
    worker = control_stack.workers[0]
    assert worker.pid is not None
    cores = [
        p for p in psutil.Process(worker.pid).children(recursive=True) if "EngineCore" in p.name()
    ]
    assert cores, [p.name() for p in psutil.Process(worker.pid).children(recursive=True)]
    async with aiohttp.ClientSession() as session:
        streams = [
            asyncio.ensure_future(
                completion(
                    session,
                    control_stack.frontend.base_url,
                    MODEL,
                    "",
                    max_tokens=CONTEXT - len(PROMPTS[n]) - 1,
                    stream=True,
                    extra={"prompt": PROMPTS[n], "ignore_eos": True},
                )
            )
            for n in range(8)
        ]
        await asyncio.sleep(1.5)
        for core in cores:
            core.kill()
        killed = time.monotonic()
        code = await asyncio.to_thread(worker.wait, ENGINE_DEATH_EXIT_BOUND_S + 10)
        exited_s = time.monotonic() - killed
        results = await asyncio.gather(*streams)
    print(f"engine-core death: worker exit {code} after {exited_s:.2f}s")
    assert code == ENGINE_DEAD_EXIT_CODE, control_stack.logs()
    assert exited_s <= ENGINE_DEATH_EXIT_BOUND_S
    finished = sum(r.ok and r.finish_reason == "length" for r in results)
    failed = sum(not r.ok for r in results)
    print(f"engine-core death: {finished} finished, {failed} ended with an error")
    # Every stream ended: finished before the kill, or with an error (none cut silently).
    outcomes = [(r.status, r.finish_reason, r.error) for r in results]
    assert finished + failed == len(results), outcomes
    errors = [r.error for r in results if not r.ok]
    print(f"engine-core death: clients saw {errors}")
    # The worker's typed EngineShutdown ("the vLLM engine core died") or, for a stream that
    # had not reached the worker's response yet, the frontend's own error: never a silent end.
    assert all(errors), errors
    log = worker.log_tail(20000)
    # Out of discovery before the exit.
    assert "Endpoint unregistered from discovery" in log, log
    # Out of discovery: the router sends everything to the other worker, which serves it.
    for prompt in PROMPTS[:4]:
        result, ids = await complete_ids(control_stack, prompt)
        assert result.ok and ids, f"{result.status} {result.error}\n{control_stack.logs()}"

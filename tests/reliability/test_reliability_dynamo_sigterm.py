"""The comparison the README makes: Dynamo 1.6.1's own Python path on SIGTERM.

Runs the unmodified ``dynamo.common.backend.sample_main`` (Dynamo's sample Python backend on
its Rust worker runtime, from the frontend venv) behind the real frontend, file discovery,
everything on 127.0.0.1, and SIGTERMs it with 4 short (~1 s) and 8 long (~10 s) streams in
flight. Measured (and asserted): the short streams finish; the long ones are cut when its
grace period (5 s by default) ends, without a ``finish_reason`` (an error event and/or a bare
``[DONE]``), unlike ``backend_common``'s drain (``test_reliability_shutdown.py``), which ends
them with a clean terminal. About 15 s.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from reliability_results import record
from worker_probes import words

from backend_common.devstack.frontend import Frontend, free_system_port, hermetic_env, worker_env
from backend_common.devstack.openai import chat
from backend_common.devstack.services import ManagedProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SHORT_TOKENS, LONG_TOKENS = 100, 1000  # 10 ms per token (the sample's default delay)


async def test_dynamo_sample_backend_cuts_streams_on_sigterm(
    tmp_path: Path, tiny_model: Path, frontend_python: str
) -> None:
    frontend = Frontend(workdir=tmp_path / "fe", python=frontend_python, discovery_backend="file")
    env = hermetic_env(
        worker_env(
            discovery_backend="file",
            file_kv=tmp_path / "fe" / "filekv",
            system_port=free_system_port(),
        )
    )
    env.update(HOME=str(tmp_path / "home"), HF_HOME=str(tmp_path / "hf"))
    model = str(tiny_model)
    argv = [frontend_python, "-m", "dynamo.common.backend.sample_main", "--model-name", model]
    argv += ["--discovery-backend", "file", "--disable-kv-routing"]
    worker = ManagedProcess(argv, env=env, log_path=tmp_path / "sample.log", cwd=tmp_path)
    try:
        frontend.start()
        worker.start()
        frontend.wait_for_model(model, timeout=60, watch=[worker])
        ended: dict[int, float] = {}
        async with aiohttp.ClientSession() as s:

            async def stream(i: int, n: int):
                r = await chat(s, frontend.base_url, model, "w1", max_tokens=n, stream=True)
                ended[i] = time.monotonic()
                return r

            short = [asyncio.create_task(stream(i, SHORT_TOKENS)) for i in range(4)]
            long = [asyncio.create_task(stream(4 + i, LONG_TOKENS)) for i in range(8)]
            await asyncio.sleep(0.5)
            t_sigterm = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            short_r = await asyncio.gather(*short)
            long_r = await asyncio.gather(*long)
        code = await asyncio.to_thread(worker.wait, 30)
        exit_s = time.monotonic() - t_sigterm
    finally:
        worker.terminate(15)
        frontend.stop()

    full = words(LONG_TOKENS).strip()
    long_end = [ended[4 + i] - t_sigterm for i in range(8)]
    short_ok = sum(r.ok and r.finish_reason == "length" for r in short_r)
    cut = [r for r in long_r if r.finish_reason is None and len(r.text.strip()) < len(full)]
    outcomes = sorted(
        {
            f"{r.status} finish={r.finish_reason} error={r.error and r.error.get('code')} "
            f"done={r.done}"
            for r in long_r
        }
    )
    record(
        "dynamo_sample_sigterm",
        title="For comparison: Dynamo 1.6.1 `sample_main` (Python engine, Rust runtime), "
        "SIGTERM with 4 short + 8 long streams",
        order=25,
        bounds=["short streams finish", "long streams cut: no `finish_reason`, text truncated"],
        summary=(
            f"{short_ok}/4 short finished; {len(cut)}/8 long cut without `finish_reason` "
            f"{long_end and min(long_end):.2f}-{max(long_end):.2f} s after SIGTERM, as "
            f"{outcomes}; exit {code} after {exit_s:.1f} s"
        ),
        measured={
            "short_finished": short_ok,
            "long_cut": len(cut),
            "long_end_s": [round(x, 2) for x in long_end],
            "long_outcomes": outcomes,
            "exit": code,
            "exit_s": round(exit_s, 2),
        },
    )
    assert short_ok == 4, [(r.status, r.finish_reason, r.error) for r in short_r]
    assert len(cut) == 8, outcomes

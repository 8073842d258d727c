"""``python -m bench --smoke`` runs end to end and writes a well-formed result and chart.

It starts the real stack (etcd, NATS, the Dynamo 1.6.1 frontend) and two workers, ours (a)
and Dynamo's sample backend (c), through the benchmark itself, in a subprocess so that every
process it starts is stopped by it. Numbers are not asserted (benchmarks measure, tests
check behaviour): only that every request succeeded and that the files hold what the report
promises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, RUNTIME_SRC

pytestmark = pytest.mark.e2e

LEVEL_KEYS = {
    "concurrency",
    "requests",
    "ok",
    "errors",
    "requests_per_s",
    "output_tokens_per_s",
    "ttft_ms_p50",
    "ttft_ms_p99",
    "itl_ms_p50",
    "itl_ms_p99",
    "events_per_request",
    "tokens_per_event",
    "worker_cpu_s_per_1k_tokens",
    "frontend_cpu_s_per_1k_tokens",
    "client_cpu_s_per_1k_tokens",
    "worker_runq_wait_per_s",
}


def test_bench_smoke_writes_result_and_chart(frontend_python: str, tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = dict(os.environ)
    env["DYNAMO_FRONTEND_PYTHON"] = frontend_python
    env["PYTHONPATH"] = os.pathsep.join([str(RUNTIME_SRC), str(REPO)])
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    latest = out / "latest.json"
    stamped = [p for p in out.glob("*.json") if p.name != "latest.json"]
    assert latest.is_file() and len(stamped) == 1
    assert stamped[0].read_bytes() == latest.read_bytes()
    for png in (out / "latest.png", stamped[0].with_suffix(".png")):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = json.loads(latest.read_text())
    assert result["smoke"] is True
    assert set(result["targets"]) == {"a", "c"}
    rounds = result["config"]["rounds"]
    plan = {lv["concurrency"]: lv["requests"] * rounds for lv in result["config"]["levels"]}
    for key, target in result["targets"].items():
        assert "error" not in target, target.get("error")
        assert target["idle_rss_kib"] > 0 and target["loaded_rss_kib"] > 0
        assert target["launch"] and f"({key}) {target['launch']}" in proc.stdout
        assert [lv["concurrency"] for lv in target["levels"]] == list(plan)
        for level in target["levels"]:
            assert LEVEL_KEYS <= set(level), (key, level)
            assert level["errors"] == 0, level["error_samples"]
            assert level["ok"] == plan[level["concurrency"]]
            assert level["output_tokens"] == level["ok"] * result["config"]["max_tokens"]
            assert level["output_tokens_per_s"] > 0
            assert level["ttft_ms_p50"] > 0
            # Both engines stream one token per item, and the frontend makes one SSE event
            # of each: the client must count exactly max_tokens events per request.
            assert level["events_per_request"] == result["config"]["max_tokens"]
            assert level["tokens_per_event"] == 1.0
            assert level["worker_cpu_s_per_1k_tokens"] > 0
    # Ratios are computed from this run's own numbers, for every level both targets ran.
    assert set(result["ratios"]) == {"a/c"}
    assert set(result["ratios"]["a/c"]) == {str(c) for c in plan}
    assert {g["goal"] for g in result["goals"]} >= {"(a) tok/s >= 1.5x (c) at c=16"}
    assert "(a) backend_common reference" in proc.stdout  # the printed table

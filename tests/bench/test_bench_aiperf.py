"""The aiperf cross-check's wiring (``bench.aiperf``), the frontend ceiling and the level plan.

aiperf itself is not run here (its environment is about 1.2 GB and a run takes minutes on two
cores): stand-in executables written by the tests play the installed aiperf, so what is checked
is the command line, the first-use install decision, the environment aiperf gets and the
parsing of its export. ``make bench`` runs the real one.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from bench.__main__ import level_plan, parse_args
from bench.aiperf import (
    AIPERF_VERSION,
    AiperfError,
    aiperf_command,
    compare,
    ensure_aiperf,
    run_aiperf,
    summarize,
)
from bench.report import check_goals, frontend_ceiling, ratios


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _export(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "output_token_throughput": {"avg": 1000.0, "unit": "tokens/sec"},
        "request_throughput": {"avg": 15.625, "unit": "requests/sec"},
        "time_to_first_token": {"avg": 11.0, "p50": 10.0, "p99": 30.0, "unit": "ms"},
        "inter_token_latency": {"avg": 1.0, "p50": 0.5, "p99": 4.0, "unit": "ms"},
        "request_count": {"avg": 100.0},
        "effective_concurrency": {"avg": 14.5},
        "http_req_connecting": {"p50": 0.4},
        "benchmark_duration": {"avg": 6.4},
    }
    data.update(overrides)
    return data


def test_command_matches_the_load_generator() -> None:
    argv = aiperf_command(
        "/x/aiperf",
        url="http://127.0.0.1:8000",
        model="m",
        tokenizer="/models/tiny",
        concurrency=64,
        requests=200,
        warmup=64,
        max_tokens=64,
        artifact_dir=Path("/tmp/a"),
    )
    assert argv[:2] == ["/x/aiperf", "profile"]

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert value("--tokenizer") == "/models/tiny"
    assert value("--concurrency") == "64" and value("--request-count") == "200"
    assert value("--output-tokens-mean") == "64" and value("--output-tokens-stddev") == "0"
    assert value("--synthetic-input-tokens-mean") == "32"
    # bench.load opens a new connection per request; aiperf must too for TTFT to compare.
    assert value("--connection-reuse-strategy") == "never"
    assert "--use-server-token-count" in argv and "--streaming" in argv


def test_summarize_reads_the_export_and_refuses_a_missing_one(tmp_path: Path) -> None:
    nested = tmp_path / "run" / "deep"
    nested.mkdir(parents=True)
    (nested / "profile_export_aiperf.json").write_text(json.dumps(_export()))
    figures = summarize(tmp_path / "run")
    assert figures["output_tokens_per_s"] == 1000.0
    assert figures["ttft_ms_p50"] == 10.0 and figures["itl_ms_p99"] == 4.0
    assert figures["errors"] == 0 and figures["effective_concurrency"] == 14.5
    with pytest.raises(AiperfError, match="no profile_export_aiperf.json"):
        summarize(tmp_path / "empty")


def test_run_aiperf_drops_hf_hub_offline_and_reports_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export = json.dumps(_export())
    fake = _script(
        tmp_path / "bin" / "aiperf",
        "import os, sys, pathlib\n"
        "if 'HF_HUB_OFFLINE' in os.environ: sys.exit('HF_HUB_OFFLINE leaked')\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--artifact-dir') + 1])\n"
        f"(out / 'profile_export_aiperf.json').write_text({export!r})\n",
    )
    artifacts = tmp_path / "artifacts"
    argv = [str(fake), "profile", "--artifact-dir", str(artifacts)]
    figures = run_aiperf(argv, artifact_dir=artifacts, timeout=60)
    assert figures["output_tokens_per_s"] == 1000.0
    assert figures["client_cpu_s"] >= 0.0

    failing = _script(tmp_path / "bin" / "broken", "import sys; print('boom'); sys.exit(3)\n")
    with pytest.raises(AiperfError, match="exited 3: boom"):
        run_aiperf([str(failing)], artifact_dir=tmp_path / "b", timeout=60)


def test_ensure_aiperf_installs_only_on_first_use(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    version = f"print({AIPERF_VERSION!r})\n"
    _script(venv / "bin" / "python", version)
    _script(venv / "bin" / "aiperf", "")
    # Installed at the pinned version: nothing runs, not even the base interpreter.
    assert ensure_aiperf(venv, python="/nonexistent/python") == venv / "bin" / "aiperf"

    stale = tmp_path / "stale"
    _script(stale / "bin" / "python", "print('0.1.0')\n")
    _script(stale / "bin" / "aiperf", "")
    failing = _script(tmp_path / "base-python", "import sys; sys.exit('no venv here')\n")
    with pytest.raises(AiperfError, match="no venv here"):
        ensure_aiperf(stale, python=str(failing))


def test_compare_flags_agreement_within_ten_percent() -> None:
    ours = {"output_tokens_per_s": 1050.0, "ttft_ms_p50": 12.0}
    out = compare(ours, summarize_like(1000.0, 10.0))
    assert out["output_tokens_per_s"]["agree"] is True
    assert out["ttft_ms_p50"]["ratio"] == pytest.approx(1.2)
    assert out["ttft_ms_p50"]["agree"] is False


def summarize_like(tok_s: float, ttft_ms: float) -> dict[str, float]:
    return {"output_tokens_per_s": tok_s, "ttft_ms_p50": ttft_ms}


def _level(c: int, tok_s: float, worker: float, frontend: float) -> dict[str, object]:
    return {
        "concurrency": c,
        "ok": 10,
        "errors": 0,
        "output_tokens_per_s": tok_s,
        "ttft_ms_p50": 5.0,
        "itl_ms_p50": 0.1,
        "worker_cpu_s_per_1k_tokens": worker,
        "frontend_cpu_s_per_1k_tokens": frontend,
    }


def test_frontend_ceiling_and_shares() -> None:
    targets = {
        "z": {"levels": [_level(64, 40000.0, 0.01, 0.02), _level(256, 38000.0, 0.01, 0.025)]},
        "a": {"levels": [_level(64, 20000.0, 0.02, 0.02), _level(256, 30000.0, 0.03, 0.025)]},
    }
    ceiling = frontend_ceiling(targets)
    assert ceiling is not None
    assert ceiling["tokens_per_s"] == {"64": pytest.approx(50000.0), "256": pytest.approx(40000.0)}
    assert ceiling["best_tokens_per_s"] == pytest.approx(50000.0)
    assert ceiling["shares"]["a"] == {"64": pytest.approx(0.4), "256": pytest.approx(0.75)}
    assert frontend_ceiling({"a": targets["a"]}) is None


def test_goals_hold_cpu_per_token_to_its_c64_figure() -> None:
    targets = {
        "a": {"levels": [_level(64, 1.0, 0.020, 0.0), _level(1024, 1.0, 0.0215, 0.0)]},
        "b": {"levels": [_level(64, 1.0, 0.020, 0.0), _level(256, 1.0, 0.030, 0.0)]},
    }
    goals = {g["goal"]: g for g in check_goals(ratios(targets), targets)}
    a = goals["(a) worker CPU per 1k tokens at c=1024 <= 1.1x c=64"]
    b = goals["(b) worker CPU per 1k tokens at c=256 <= 1.1x c=64"]
    assert a["met"] is True and a["ratio"] == pytest.approx(1.075)
    assert b["met"] is False and b["ratio"] == pytest.approx(1.5)
    assert goals["no errors at any level (failed requests, summed over every target)"]["met"]


def test_level_plan_reaches_c1024_with_two_requests_per_slot() -> None:
    args = parse_args([])
    plan = {c: (n, w) for c, n, w in level_plan(args)}
    assert list(plan) == [1, 16, 64, 256, 512, 1024]
    assert plan[256] == (768, 256)
    assert plan[1024] == (2048, 1024)
    assert args.aiperf_level == 64
    assert parse_args(["--smoke"]).aiperf_level is None
    assert parse_args(["--no-aiperf"]).aiperf_level is None

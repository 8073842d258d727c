"""The vLLM pair's harness without vLLM: stream accounting, parity, goals, the CLI, the shim.

``bench.vllm_probes`` decides from the bytes a client received whether a stream finished,
ended with a typed error or was cut; ``bench.vllm_report`` turns a result into goals and
the docs section; ``python -m bench --pairs`` selects the pair; ``bench/anchor_shim`` stands
in for torchvision in Dynamo's own vLLM worker. All of it is checked here on hand-made
inputs (the pair itself needs two vLLM venvs and runs only under ``python -m bench --pairs
e/f``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import parse_args
from bench.report import ratios
from bench.vllm_probes import (
    StreamOutcome,
    classify,
    completion_token_ids,
    engine_core_pids,
    parity,
    parse_sse,
    tally,
)
from bench.vllm_report import check_goals, format_table, render_markdown

SHIM = Path(__file__).resolve().parents[2] / "bench" / "anchor_shim"


def _chunk(content: str, finish: str | None = None) -> bytes:
    import json

    choice = {"index": 0, "delta": {"content": content}, "finish_reason": finish}
    return b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"


def test_a_stream_with_a_finish_reason_finished() -> None:
    body = _chunk("a") + _chunk("b") + _chunk("c", "length") + b"data: [DONE]\n\n"
    outcome = classify(200, body, None)
    assert (outcome.kind, outcome.finish_reason, outcome.tokens) == ("finished", "length", 3)


def test_crlf_framing_is_read_too() -> None:
    body = (_chunk("a") + _chunk("b", "stop")).replace(b"\n", b"\r\n")
    assert classify(200, body, None).kind == "finished"


def test_an_error_event_is_a_typed_error_even_after_tokens() -> None:
    body = _chunk("a") + b'event: error\ndata: {"message":"engine died"}\n\n'
    outcome = classify(200, body, None)
    assert outcome.kind == "error" and "engine died" in (outcome.detail or "")
    assert parse_sse(body).events == ["error"]


def test_an_error_object_in_a_data_line_is_a_typed_error() -> None:
    body = _chunk("a") + b'data: {"error": {"message": "EngineShutdown"}}\n\n'
    assert classify(200, body, None).kind == "error"


def test_a_non_200_answer_is_a_typed_error() -> None:
    assert classify(503, b'{"message":"no instances"}', None).kind == "error"


def test_a_stream_without_finish_reason_is_cut() -> None:
    outcome = classify(200, _chunk("a") + _chunk("b"), "ClientPayloadError: ended")
    assert outcome.kind == "cut" and "ClientPayloadError" in (outcome.detail or "")
    # [DONE] alone is not a terminal: the client never learns why the text stopped.
    done = classify(200, _chunk("a") + b"data: [DONE]\n\n", None)
    assert done.kind == "cut" and "after [DONE]" in (done.detail or "")


def test_no_response_at_all_is_cut() -> None:
    assert classify(None, b"", "ConnectionResetError").kind == "cut"


def test_tally_counts_kinds_and_reasons() -> None:
    outcomes = [
        StreamOutcome("finished", "length"),
        StreamOutcome("finished", "length"),
        StreamOutcome("finished", "stop"),
        StreamOutcome("error", detail="x"),
        StreamOutcome("cut", detail="y"),
    ]
    t = tally(outcomes)
    assert (t["streams"], t["finished"], t["error"], t["cut"]) == (5, 3, 1, 1)
    assert t["finish_reasons"] == {"length": 2, "stop": 1}
    assert t["samples"] == ["x", "y"]


def test_completion_token_ids_from_the_response_or_its_choice() -> None:
    assert completion_token_ids({"nvext": {"completion_token_ids": [1, 2]}}) == [1, 2]
    body = {"choices": [{"text": "x", "nvext": {"completion_token_ids": [3]}}]}
    assert completion_token_ids(body) == [3]
    assert completion_token_ids({"choices": [{"text": "x"}]}) is None


def test_parity_counts_errors_as_unequal() -> None:
    result = parity([[1, 2], [3], "HTTP 400: no"], [[1, 2], [4], [5]])
    assert (result["equal"], result["prompts"]) == (1, 3)
    assert [m["prompt"] for m in result["mismatches"]] == [1, 2]


def test_engine_core_pids_skips_the_worker_itself() -> None:
    # This process is no engine core, and the worker's own pid is never reported.
    import os

    assert engine_core_pids(os.getpid(), lambda pid: [pid]) == []


def _level(c: int, tok_s: float, ttft: float) -> dict:
    return {
        "concurrency": c,
        "output_tokens_per_s": tok_s,
        "ttft_ms_p50": ttft,
        "ttft_ms_p99": ttft * 2,
        "itl_ms_p50": 1.0,
        "itl_ms_p99": 2.0,
        "worker_cpu_s_per_1k_tokens": 0.5,
        "errors": 0,
    }


def _probe(finished: int, error: int, cut: int, before: bool) -> dict:
    return {
        "signal": "SIGTERM",
        "signalled": "worker",
        "streams": tally(
            [StreamOutcome("finished", "length")] * finished
            + [StreamOutcome("error", detail="e")] * error
            + [StreamOutcome("cut", detail="c")] * cut
        ),
        "exit_s": 6.1,
        "exit_code": 0,
        "out_of_discovery_s": 0.3,
        "out_of_discovery_before_exit": before,
        "last_stream_end_s": 4.0,
        "leaked_shm": [],
        "exit_timeout_s": 60.0,
    }


def _result() -> dict:
    targets = {
        "e": {"name": "ours", "levels": [_level(1, 100, 10), _level(16, 900, 30)]},
        "f": {"name": "theirs", "levels": [_level(1, 120, 12), _level(16, 800, 25)]},
    }
    return {
        "timestamp": "20261208T000000Z",
        "command": "python -m bench --pairs e/f",
        "duration_s": 300.0,
        "host": {"cpus": 2, "cpu_model": "x", "loadavg_at_start": [1.0], "loadavg_at_end": [2.0]},
        "config": {
            "levels": [{"concurrency": 1, "requests": 16, "warmup": 4}],
            "rounds": 2,
            "max_tokens": 64,
            "request_extra": {"ignore_eos": True},
            "engine_flags": "--enforce-eager",
            "engine_env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
            "parity": {"prompts": 4, "max_tokens": 16},
            "probe": {"streams": 16, "max_tokens": 384},
        },
        "anchor_install": {"install_s": 178.5, "size_bytes": 2**31, "versions": {"x": "1"}},
        "e_side": {"source": "examples/vllm-cpu"},
        "targets": targets,
        "ratios": ratios(targets),
        "parity": {"e": parity([[1]], [[1]]), "f": parity([[2]], [[1]])},
        "sigterm": {"e": _probe(16, 0, 0, True), "f": _probe(10, 0, 6, False)},
        "sigkill_engine_core": {"e": _probe(0, 15, 1, True), "f": {"error": "no engine core"}},
    }


def test_goals_follow_the_measured_ratios_parity_and_probes() -> None:
    result = _result()
    goals = {g["goal"]: g for g in check_goals(result)}
    assert goals["(e)/(f) output tok/s >= 1.0 at c=1"]["met"] is False  # 100 / 120
    assert goals["(e)/(f) output tok/s >= 1.0 at c=16"]["met"] is True  # 900 / 800
    assert goals["(e)/(f) TTFT p50 <= 1.0 at c=1"]["met"] is True  # 10 / 12
    assert goals["(e)/(f) TTFT p50 <= 1.0 at c=16"]["met"] is False  # 30 / 25
    assert goals["(e) greedy ids identical to offline LLM.generate at c=1"]["met"] is True
    assert goals["(f) greedy ids identical to offline LLM.generate at c=1"]["met"] is False
    sigterm = "(e) SIGTERM to the worker: no stream ends without a terminal or typed error"
    assert goals[sigterm]["met"] is True
    sigkill = "(e) SIGKILL to its engine core: no stream ends without a terminal or typed error"
    assert goals[sigkill]["met"] is False and goals[sigkill]["measured"] == "1 cut"


def test_table_and_doc_section_show_every_probe_and_level() -> None:
    result = _result()
    result["goals"] = check_goals(result)
    text = format_table(result)
    assert "FAILED: no engine core" in text and "NOT MET" in text
    doc = "\n".join(render_markdown(result))
    assert doc.count("| (e) | 1 |") == 1 and doc.count("| (f) | 16 |") == 1
    assert "(e) 1/1 identical; (f) 0/1 identical" in doc
    assert "| (f) | SIGTERM to the worker | 16 | 10 | 0 | 6 |" in doc


def test_pairs_flag_selects_targets_and_the_vllm_pair() -> None:
    only = parse_args(["--pairs", "e/f"])
    assert only.vllm_pair is True and only.targets == []
    both = parse_args(["--pairs", "a/c,e/f"])
    assert both.vllm_pair is True and both.targets == ["a", "c"]
    default = parse_args([])
    assert default.vllm_pair is False and "e" not in default.targets
    with pytest.raises(SystemExit):
        parse_args(["--pairs", "x/y"])


def test_the_shim_answers_torchvision_imports_inertly() -> None:
    code = (
        "import torchvision, torchvision.io\n"
        "from torchvision.transforms import v2, InterpolationMode\n"
        "assert isinstance(InterpolationMode.NEAREST_EXACT, str)\n"
        "assert v2.functional is not None\n"
        "print(torchvision.__version__)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(SHIM), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0.0.0+inert"


def test_the_anchor_venv_counts_as_installed_only_with_its_marker(tmp_path: Path) -> None:
    from bench.anchor_install import MARKER, anchor_env, ensure_anchor_venv, read_marker

    assert read_marker(tmp_path) is None
    (tmp_path / MARKER).write_text("not json")
    assert read_marker(tmp_path) is None
    (tmp_path / MARKER).write_text('{"install_s": 1.0, "size_bytes": 2}')
    # A complete venv is used as it is: no install step runs (it would take minutes).
    python, marker = ensure_anchor_venv(tmp_path)
    assert python == str(tmp_path / "bin" / "python") and marker["install_s"] == 1.0
    assert anchor_env() == {"PYTHONPATH": str(SHIM)}
    assert (SHIM / "sitecustomize.py").is_file()

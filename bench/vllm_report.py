"""The vLLM pair's outputs: goals, the printed table, the result files and the doc section.

``check_goals(result)`` evaluates the issue's targets for (e)/(f) on one result of
``bench.vllm_pair`` (numbers of the same run only); they are reported, never asserted.
``write_vllm_results(result, out_dir)`` writes ``vllm-<stamp>.json`` and
``vllm-latest.json``. ``render_markdown(result)`` is the section of docs/benchmark.md that
``python -m bench.publish`` generates from the committed ``docs/benchmark/vllm.json``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

__all__ = ["check_goals", "format_table", "render_markdown", "write_vllm_results"]

PAIR = "e/f"
PHASES = (
    ("sigterm", "SIGTERM to the worker"),
    ("sigkill_engine_core", "SIGKILL to its engine core"),
)


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and not digits:
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _mib(kib: Any) -> str:
    return _f(kib / 1024 if isinstance(kib, int | float) else None)


def check_goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's (e)/(f) targets, each with what was measured and whether it was met."""
    pair = (result.get("ratios") or {}).get(PAIR) or {}
    goals: list[dict[str, Any]] = []

    def add(name: str, value: Any, met: bool | None) -> None:
        goals.append({"goal": name, "measured": value, "met": met})

    for c in sorted(pair, key=int):
        tok = pair[c].get("output_tokens_per_s")
        add(f"(e)/(f) output tok/s >= 1.0 at c={c}", tok, None if tok is None else tok >= 1.0)
    for c in sorted(pair, key=int):
        ttft = pair[c].get("ttft_ms_p50")
        add(f"(e)/(f) TTFT p50 <= 1.0 at c={c}", ttft, None if ttft is None else ttft <= 1.0)
    for key in ("e", "f"):
        par = (result.get("parity") or {}).get(key)
        value = f"{par['equal']}/{par['prompts']}" if par else None
        add(
            f"({key}) greedy ids identical to offline LLM.generate at c=1",
            value,
            None if not par else par["equal"] == par["prompts"],
        )
    for phase, label in PHASES:
        probe = (result.get(phase) or {}).get("e") or {}
        streams = probe.get("streams")
        cut = streams.get("cut") if streams else None
        add(
            f"(e) {label}: no stream ends without a terminal or typed error",
            None if cut is None else f"{cut} cut",
            None if cut is None else cut == 0,
        )
        before = probe.get("out_of_discovery_before_exit")
        add(f"(e) {label}: out of discovery before exit", before, before)
    return goals


def write_vllm_results(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """``vllm-<stamp>.json`` and ``vllm-latest.json`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"vllm-{result['timestamp']}.json"
    path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    latest = out_dir / "vllm-latest.json"
    shutil.copyfile(path, latest)
    return {"json": path, "latest": latest}


def _level_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for key, t in result["targets"].items():
        if t.get("error"):
            rows.append([f"({key})", f"FAILED: {t['error'][:100]}"])
            continue
        for lv in t["levels"]:
            rows.append(
                [
                    f"({key})",
                    str(lv["concurrency"]),
                    _f(lv["output_tokens_per_s"], 0),
                    _f(lv["ttft_ms_p50"], 2),
                    _f(lv["ttft_ms_p99"], 2),
                    _f(lv["itl_ms_p50"], 2),
                    _f(lv["itl_ms_p99"], 2),
                    _f(lv.get("worker_cpu_s_per_1k_tokens"), 3),
                    _mib(t.get("idle_rss_kib")),
                    _mib(t.get("loaded_rss_kib")),
                    str(lv["errors"]),
                ]
            )
    return rows


LEVEL_HEAD = [
    "target",
    "c",
    "out tok/s",
    "TTFT p50",
    "TTFT p99",
    "ITL p50",
    "ITL p99",
    "worker CPU s/1k tok",
    "RSS idle MiB",
    "RSS loaded MiB",
    "errors",
]

PROBE_HEAD = [
    "target",
    "signal",
    "streams",
    "finished",
    "typed error",
    "cut",
    "exit after s",
    "exit code",
    "out of discovery after s",
    "out of discovery before exit",
    "new /dev/shm left",
]


def _probe_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for phase, label in PHASES:
        for key, p in (result.get(phase) or {}).items():
            if "error" in p:
                rows.append([f"({key})", label, f"FAILED: {p['error'][:100]}"])
                continue
            s = p["streams"]
            rows.append(
                [
                    f"({key})",
                    label,
                    str(s["streams"]),
                    str(s["finished"]),
                    str(s["error"]),
                    str(s["cut"]),
                    _f(p["exit_s"], 2) if p["exit_s"] is not None else f"> {p['exit_timeout_s']}",
                    str(p["exit_code"]),
                    _f(p["out_of_discovery_s"], 2),
                    _f(p["out_of_discovery_before_exit"]),
                    str(len(p["leaked_shm"])),
                ]
            )
    return rows


def _md(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def format_table(result: dict[str, Any]) -> str:
    """Plain text: the level table, parity, probes, launch lines and goals."""
    out = ["  ".join(LEVEL_HEAD)]
    out += ["  ".join(r) for r in _level_rows(result)]
    out.append("")
    for key, par in (result.get("parity") or {}).items():
        out.append(
            f"({key}) greedy parity with offline LLM.generate: {par['equal']}/{par['prompts']}"
        )
    out.append("")
    out.append("  ".join(PROBE_HEAD))
    out += ["  ".join(r) for r in _probe_rows(result)]
    out.append("")
    for key, t in result["targets"].items():
        out.append(f"({key}) {t.get('launch', '-')}")
    out.append("")
    for g in result.get("goals") or []:
        state = {True: "MET", False: "NOT MET", None: "n/a"}[g["met"]]
        out.append(f"  {state:<8} {g['goal']} (measured {_f(g['measured'], 2)})")
    return "\n".join(out)


def render_markdown(result: dict[str, Any]) -> list[str]:
    """The "vLLM pair" section of docs/benchmark.md (lines, no trailing newline)."""
    host, cfg = result["host"], result["config"]
    anchor = result.get("anchor_install") or {}
    e_side = result.get("e_side") or {}
    out = [
        "## The vLLM pair: (e) engine_kind=vllm vs (f) Dynamo's vLLM worker",
        "",
        "`python -m bench --pairs e/f` (`make bench-vllm`; not part of the default `make bench`,",
        "whose 15-minute budget it would not fit) serves (e) our `engine_kind=vllm` worker and",
        "(f) `python -m dynamo.vllm` of ai-dynamo 1.6.1 behind the same frontend as above, on",
        "the same tiny random-weight Llama (head size 64, byte-level BPE tokenizer), the same",
        f"vLLM engine flags (`{cfg['engine_flags']}`, "
        + ", ".join(f"`{k}={v}`" for k, v in cfg["engine_env"].items())
        + ") and the same load, KV events off on both (ours `--disable-kv-routing`; Dynamo's",
        "publishes only with `--kv-events-config`, not given). Every request carries",
        f"`{json.dumps(cfg['request_extra'])}`: random weights would otherwise end some streams",
        "early at EOS. CPU and RSS are of each worker's process tree (vLLM's engine core is a",
        "child process, counted on both sides). Source: `bench/vllm_pair.py`, results",
        "[`benchmark/vllm.json`](benchmark/vllm.json).",
        "",
        f"* Run (UTC) {result['timestamp']}, {_f(result.get('duration_s'))} s; command "
        f"`{result.get('command', '-')}`; {host['cpus']} cores ({host.get('cpu_model', '-')}),",
        f"  load average (1 min) {_f(host['loadavg_at_start'][0], 2)} at the start, "
        f"{_f((host.get('loadavg_at_end') or [None])[0], 2)} at the end.",
        f"* (e) side: {e_side.get('source', '-')}; python `{e_side.get('python', '-')}`, "
        f"`PYTHONPATH` `{e_side.get('src', '-')}`."
        + (
            ""
            if str(e_side.get("source", "")).startswith("examples/")
            else " **This run's (e) is a stand-in from outside the repository, not the"
            " committed example: its figures are provisional until the pair is rerun on"
            " `examples/vllm-cpu`.**"
        ),
        f"* (f) venv `.venv-dynamo-vllm`, installed by the bench (`bench/anchor_install.py`) in "
        f"{_f(anchor.get('install_s'))} s, {_f((anchor.get('size_bytes') or 0) / 2**30, 2)} GiB "
        "("
        + ", ".join(
            f"{k} {v or 'not installed'}" for k, v in (anchor.get("versions") or {}).items()
        )
        + ");",
        "  it runs with `bench/anchor_shim` on `PYTHONPATH` (an inert `torchvision`, which",
        "  `dynamo.vllm` imports at start-up; the CPU torch cannot load the PyPI one).",
        "* Plan per round: "
        + ", ".join(
            f"c={lv['concurrency']}: {lv['requests']} requests after {lv['warmup']} warm-up"
            for lv in cfg["levels"]
        )
        + f"; {cfg['rounds']} rounds; {cfg['max_tokens']} output tokens per request.",
        "",
        "Launch lines (the bench adds the stack's discovery, NATS and system-port environment):",
        "",
        "```",
    ]
    for key, t in result["targets"].items():
        out.append(f"({key}) {t.get('launch', '-')}")
    out += ["```", "", "Latencies in ms.", ""]
    out += _md(LEVEL_HEAD, _level_rows(result))
    pair = (result.get("ratios") or {}).get(PAIR) or {}
    if pair:
        out += [
            "",
            "(e)/(f): "
            + "; ".join(
                f"c={c}: tok/s {_f(v.get('output_tokens_per_s'), 2)}, TTFT p50 "
                f"{_f(v.get('ttft_ms_p50'), 2)}, ITL p50 {_f(v.get('itl_ms_p50'), 2)}"
                for c, v in pair.items()
            )
            + ".",
        ]
    par = result.get("parity") or {}
    pc = cfg["parity"]
    out += [
        "",
        f"Greedy parity at c=1 ({pc['prompts']} token-id prompts of different lengths, "
        f"{pc['max_tokens']} tokens each, `/v1/completions`, temperature 0, ids read from",
        '`"nvext": {"extra_fields": ["completion_token_ids"]}`) against vLLM\'s offline',
        "`LLM.generate` on the same model: "
        + "; ".join(f"({k}) {v['equal']}/{v['prompts']} identical" for k, v in par.items())
        + ".",
        "",
        f"Signals with {cfg['probe']['streams']} streaming requests in flight (each asking for "
        f"{cfg['probe']['max_tokens']} tokens, every stream past its first token), each on a",
        "fresh worker. Finished: a chunk carried a `finish_reason`; typed error: HTTP error or",
        "an error event; cut: the stream ended with neither. Out of discovery: the frontend",
        "stopped listing the model (checked every 0.1 s). New /dev/shm left: names created",
        "while the worker ran that were still there after it exited (other jobs on the",
        "machine can add to it).",
        "",
    ]
    out += _md(PROBE_HEAD, _probe_rows(result))
    seen = [
        f"* ({key}) {label}: " + "; ".join(f"`{x}`" for x in p["streams"]["samples"])
        for phase, label in PHASES
        for key, p in (result.get(phase) or {}).items()
        if "streams" in p and p["streams"]["samples"]
    ]
    if seen:
        out += ["", "What the clients of the streams that did not finish saw:", "", *seen]
    out += ["", "| target (issue 21, not asserted) | measured | |", "|---|---|---|"]
    for g in result.get("goals") or []:
        state = {True: "met", False: "**not met**", None: "n/a"}[g["met"]]
        out.append(f"| {g['goal']} | {_f(g['measured'], 2)} | {state} |")
    return out

"""The benchmark's outputs: ratios, the JSON result, the PNG chart and the printed table.

``ratios(targets)`` compares each like-for-like pair of ``bench.targets.PAIRS`` (a/c,
a-kv/c-kv, b/d) at every concurrency both ran, from numbers of the SAME run (never from
stored figures): output tokens/s, TTFT p50 and ITL p50 as ``ours / theirs`` (> 1 means more
throughput, or more latency). ``check_goals`` evaluates the issue's targets on them; they are
reported, never asserted.
``frontend_ceiling(targets)`` turns the ceiling target's frontend CPU per token into the
frontend's own limit per level (``1000 / frontend_cpu_s_per_1k_tokens``: the output tokens/s
at which the frontend process alone keeps one core busy) and gives every target's output
tokens/s as a share of it.
``write_results(result, out_dir)`` writes ``<UTC timestamp>.json``, ``latest.json`` and
``<timestamp>.png`` / ``latest.png`` and returns the paths. The chart uses matplotlib's Agg
backend (no display).
"""

from __future__ import annotations

import json
import math
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .targets import CEILING, PAIRS

__all__ = [
    "check_goals",
    "format_table",
    "frontend_ceiling",
    "ratios",
    "write_chart",
    "write_results",
]

RATIO_METRICS = ("output_tokens_per_s", "ttft_ms_p50", "itl_ms_p50")


def _level(targets: dict[str, Any], key: str, concurrency: int) -> dict[str, Any] | None:
    for level in (targets.get(key) or {}).get("levels", []):
        if level["concurrency"] == concurrency:
            return level
    return None


def _ratio(a: Any, b: Any) -> float | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float):
        return None
    if b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def ratios(targets: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """``{"a/c": {"16": {"output_tokens_per_s": 1.3, ...}}, ...}`` for the pairs present."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for ours, theirs in PAIRS:
        if ours not in targets or theirs not in targets:
            continue
        pair: dict[str, dict[str, float | None]] = {}
        for level in targets[ours].get("levels", []):
            c = level["concurrency"]
            other = _level(targets, theirs, c)
            if other is None:
                continue
            pair[str(c)] = {m: _ratio(level.get(m), other.get(m)) for m in RATIO_METRICS}
        out[f"{ours}/{theirs}"] = pair
    return out


def frontend_ceiling(targets: dict[str, Any]) -> dict[str, Any] | None:
    """``{"tokens_per_s": {"64": 52000.0, ...}, "best_tokens_per_s": ..., "shares": {"a":
    {"64": 0.61, ...}, ...}}`` from the ceiling target of the same run; None without it.

    The ceiling at a level is what one core of frontend CPU buys at that level's cost per
    token; a target's share is its measured output tokens/s over the ceiling at that level.
    """
    levels = (targets.get(CEILING) or {}).get("levels") or []
    ceiling: dict[str, float] = {}
    for level in levels:
        per_1k = level.get("frontend_cpu_s_per_1k_tokens")
        if isinstance(per_1k, int | float) and per_1k > 0 and level.get("ok"):
            ceiling[str(level["concurrency"])] = 1000.0 / per_1k
    if not ceiling:
        return None
    shares: dict[str, dict[str, float | None]] = {}
    for key, target in targets.items():
        row: dict[str, float | None] = {}
        for level in target.get("levels", []):
            c = str(level["concurrency"])
            if c in ceiling:
                row[c] = _ratio(level.get("output_tokens_per_s"), ceiling[c])
        shares[key] = row
    return {
        "target": CEILING,
        "tokens_per_s": ceiling,
        "best_tokens_per_s": max(ceiling.values()),
        "shares": shares,
    }


def check_goals(rat: dict[str, Any], targets: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value and whether it was met (None: n/a).

    Per level that both sides of a pair ran: (a)/(c) output tok/s >= 1.5, (b)/(d) >= 1.0,
    TTFT p50 of ours <= theirs for every pair; worker CPU per 1k output tokens of (a) and (b)
    at c=256 and c=1024 within 10 % of their c=64 figure (the ratio is level / c=64); no
    errors at any level of any target; one token per SSE event for (b).
    """

    def get(pair: str, c: str, metric: str) -> float | None:
        return ((rat.get(pair) or {}).get(c) or {}).get(metric)

    goals: list[tuple[str, float | None, str, float]] = []
    for pair, bound in (("a/c", 1.5), ("b/d", 1.0)):
        for c in rat.get(pair) or {}:
            ours, theirs = pair.split("/")
            value = get(pair, c, "output_tokens_per_s")
            goals.append((f"({ours}) tok/s >= {bound}x ({theirs}) at c={c}", value, ">=", bound))
    for pair in rat:
        ours, theirs = pair.split("/")
        for c in rat[pair]:
            value = get(pair, c, "ttft_ms_p50")
            goals.append((f"({ours}) TTFT p50 <= ({theirs}) at c={c}", value, "<=", 1.0))
    for key in ("a", "b"):
        by_c = {
            lv["concurrency"]: lv.get("worker_cpu_s_per_1k_tokens")
            for lv in (targets.get(key) or {}).get("levels", [])
        }
        for c in (256, 1024):
            if c in by_c:
                value = _ratio(by_c[c], by_c.get(64))
                name = f"({key}) worker CPU per 1k tokens at c={c} <= 1.1x c=64"
                goals.append((name, value, "<=", 1.1))
    out = []
    for name, value, op, bound in goals:
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out.append({"goal": name, "ratio": value, "bound": bound, "op": op, "met": met})
    errors = sum(lv.get("errors", 0) for t in targets.values() for lv in t.get("levels", []))
    failed = [k for k, t in targets.items() if t.get("error")]
    out.append(
        {
            "goal": "no errors at any level (failed requests, summed over every target)",
            "ratio": float(errors + len(failed)),
            "bound": 0.0,
            "op": "==",
            "met": errors == 0 and not failed,
        }
    )
    # One token per SSE event for the mocker example, at every level it ran.
    b_levels = [lv for lv in (targets.get("b") or {}).get("levels", []) if lv.get("ok")]
    worst = max((lv.get("tokens_per_event") or 0.0 for lv in b_levels), default=None)
    out.append(
        {
            "goal": "(b) SSE events per request == tokens per request (tokens/event 1.0)",
            "ratio": worst,
            "bound": 1.0,
            "op": "==",
            "met": None if worst is None else abs(worst - 1.0) < 1e-9,
        }
    )
    return out


def _mib(kib: Any) -> float | None:
    return kib / 1024 if isinstance(kib, int | float) else None


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table: one row per target and concurrency, then ratios, RSS and goals."""
    head = (
        f"{'target':<36} {'c':>3} {'req/s':>7} {'out tok/s':>9} {'TTFT p50':>8} "
        f"{'TTFT p99':>8} {'ITL p50':>7} {'ITL p99':>7} {'ev/req':>6} {'tok/ev':>6} "
        f"{'cpu/1k':>6} {'runq':>5} {'err':>3}"
    )
    lines = [head, "-" * len(head)]
    for key, target in result["targets"].items():
        label = f"({key}) {target['name']}"
        if target.get("error"):
            lines.append(f"{label:<36} FAILED: {target['error'][:80]}")
            continue
        for lv in target["levels"]:
            lines.append(
                f"{label:<36} {lv['concurrency']:>3} {_fmt(lv['requests_per_s']):>7} "
                f"{_fmt(lv['output_tokens_per_s'], 0):>9} {_fmt(lv['ttft_ms_p50'], 2):>8} "
                f"{_fmt(lv['ttft_ms_p99'], 2):>8} {_fmt(lv['itl_ms_p50'], 3):>7} "
                f"{_fmt(lv['itl_ms_p99'], 3):>7} {_fmt(lv.get('events_per_request')):>6} "
                f"{_fmt(lv.get('tokens_per_event'), 2):>6} "
                f"{_fmt(lv.get('worker_cpu_s_per_1k_tokens'), 3):>6} "
                f"{_fmt(lv.get('worker_runq_wait_per_s'), 2):>5} {lv['errors']:>3}"
            )
    lines.append(
        "(latencies in ms; ev/req: SSE events with text per request; cpu/1k: worker CPU "
        "seconds per 1000 output tokens; runq: worker threads ready but without a CPU, on "
        "average; " + result["config"]["connection"] + ")"
    )
    lines.append("")
    lines.append("ratios ours/theirs (tok/s, TTFT p50, ITL p50):")
    for pair, levels in result["ratios"].items():
        cells = [
            f"c={c}: {_fmt(v['output_tokens_per_s'], 2)} / {_fmt(v['ttft_ms_p50'], 2)}"
            f" / {_fmt(v['itl_ms_p50'], 2)}"
            for c, v in levels.items()
        ]
        lines.append(f"  {pair}: " + "; ".join(cells))
    ceiling = result.get("frontend_ceiling")
    if ceiling:
        lines.append("")
        lines.append(
            "frontend ceiling (output tok/s at one core of frontend CPU): "
            + ", ".join(f"c={c}: {v:.0f}" for c, v in ceiling["tokens_per_s"].items())
        )
        for key, row in ceiling["shares"].items():
            shares = ", ".join(f"c={c}: {_fmt(v, 2)}" for c, v in row.items())
            lines.append(f"  ({key}) share of it: {shares}")
    lines.append("")
    lines.append(
        "RSS idle / loaded peak (MiB): "
        + ", ".join(
            f"({k}) {_fmt(_mib(t.get('idle_rss_kib')))} / {_fmt(_mib(t.get('loaded_rss_kib')))}"
            for k, t in result["targets"].items()
        )
    )
    cross = result.get("aiperf") or {}
    if cross:
        lines.append("")
        if cross.get("error"):
            lines.append(f"aiperf cross-check: not run ({cross['error'][:200]})")
        else:
            lines.append(
                f"aiperf {cross.get('version')} at c={cross['concurrency']} (ours / aiperf):"
            )
        for key, target in result["targets"].items():
            figures = target.get("aiperf") or {}
            if figures.get("error"):
                lines.append(f"  ({key}) aiperf failed: {figures['error'][:200]}")
                continue
            vs = target.get("aiperf_vs_ours")
            if not vs:
                continue
            tok, ttft = vs["output_tokens_per_s"], vs["ttft_ms_p50"]
            lines.append(
                f"  ({key}) tok/s {_fmt(tok['ours'], 0)} / {_fmt(tok['aiperf'], 0)} = "
                f"{_fmt(tok['ratio'], 2)}; TTFT p50 {_fmt(ttft['ours'], 1)} / "
                f"{_fmt(ttft['aiperf'], 1)} ms = {_fmt(ttft['ratio'], 2)}; aiperf kept "
                f"{_fmt(figures.get('effective_concurrency'))} in flight, connect p50 "
                f"{_fmt(figures.get('connecting_ms_p50'), 1)} ms, its CPU "
                f"{_fmt(figures.get('client_cpu_s'), 1)} s"
            )
    lines.append("")
    lines.append("launch lines:")
    for key, target in result["targets"].items():
        if target.get("launch"):
            lines.append(f"  ({key}) {target['launch']}")
    lines.append("")
    for goal in result["goals"]:
        state = {True: "MET", False: "NOT MET", None: "n/a"}[goal["met"]]
        lines.append(f"  {state:<8} {goal['goal']} (measured {_fmt(goal['ratio'], 2)})")
    return "\n".join(lines)


def write_chart(result: dict[str, Any], path: Path) -> Path:
    """Bar charts of output tokens/s, TTFT p50, ITL p99 and worker CPU per target and level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = {k: t for k, t in result["targets"].items() if t.get("levels")}
    levels = sorted({lv["concurrency"] for t in targets.values() for lv in t["levels"]})
    metrics = [
        ("output_tokens_per_s", "output tokens/s"),
        ("ttft_ms_p50", "TTFT p50 (ms)"),
        ("itl_ms_p99", "ITL p99 (ms)"),
        ("worker_cpu_s_per_1k_tokens", "worker CPU s / 1k tokens"),
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(20, 4.8))
    width = 0.8 / max(1, len(targets))
    for ax, (metric, title) in zip(axes, metrics, strict=True):
        for i, (key, target) in enumerate(targets.items()):
            by_c = {lv["concurrency"]: lv.get(metric) for lv in target["levels"]}
            xs = [j + i * width for j in range(len(levels))]
            ys = [by_c.get(c) or 0.0 for c in levels]
            ax.bar(xs, ys, width, label=f"({key}) {target['name']}")
        ax.set_xticks([j + width * (len(targets) - 1) / 2 for j in range(len(levels))])
        ax.set_xticklabels([f"c={c}" for c in levels])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"backend_common vs Dynamo workers ({result['timestamp']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_results(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write the JSON result and chart under ``out_dir`` (timestamped and ``latest``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = result["timestamp"]
    json_path = out_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(result, indent=2, allow_nan=False, default=_jsonable) + "\n")
    latest = out_dir / "latest.json"
    shutil.copyfile(json_path, latest)
    png = write_chart(result, out_dir / f"{stamp}.png")
    latest_png = out_dir / "latest.png"
    shutil.copyfile(png, latest_png)
    return {"json": json_path, "latest": latest, "chart": png, "latest_chart": latest_png}


def _jsonable(obj: Any) -> Any:
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def timestamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")

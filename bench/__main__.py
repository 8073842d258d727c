"""``python -m bench``: backend_common's workers vs Dynamo's own, behind one real frontend.

Serves the targets of ``bench.targets`` behind the same frontend (etcd discovery, tcp request
plane, NATS events, all on 127.0.0.1) and loads them one after the other with
``bench.load.run_level``: per round, per concurrency level, each target in turn (only one is
under load at a time; the others sit idle). The rounds of a level are pooled. It writes
``bench/results/<timestamp>.json`` + ``latest.json`` and a PNG chart, then prints a table.
Nothing is asserted about the numbers: the goals are reported as met / not met.

``--smoke`` is the quick variant the test suite runs (targets a and c, few requests, ~20 s).
Exit status: 0 when every target ran with zero failed requests, 1 otherwise, 2 for a setup
problem (no frontend venv).

Requires the Dynamo frontend venv (``$DYNAMO_FRONTEND_PYTHON`` or ``.venv-dynamo``) and, for
target b, torch in this interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from backend_common.devstack.frontend import find_frontend_python
from backend_common.devstack.tinymodel import write_tiny_model

from .load import CONNECTION_MODE, PROMPT, LevelResult, run_level
from .report import check_goals, format_table, ratios, timestamp, write_results
from .targets import TARGETS, BenchStack, RunningTarget

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SETTLE_S = 1.0  # after the model is listed, before reading idle RSS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="quick run: targets a,c; few requests")
    p.add_argument("--targets", help="letters of the targets to run (default abcd; smoke: ac)")
    p.add_argument("--concurrency", help="comma-separated levels (default 1,16,64; smoke: 1,16)")
    p.add_argument("--requests", type=int, help="requests per level and round, c > 1 (default 200)")
    p.add_argument("--requests-c1", type=int, help="requests per round at c=1 (default 40)")
    p.add_argument("--rounds", type=int, help="rounds over all levels (default 3; smoke: 1)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    p.add_argument("--workdir", type=Path, help="keep logs here (default: a temporary dir)")
    p.add_argument("--frontend-python", help="python of the Dynamo 1.6.1 frontend venv")
    args = p.parse_args(argv)
    args.targets = args.targets or ("ac" if args.smoke else "abcd")
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        p.error(f"unknown targets {sorted(unknown)}; choose from {''.join(TARGETS)}")
    levels = args.concurrency or ("1,16" if args.smoke else "1,16,64")
    args.levels = [int(x) for x in levels.split(",") if x.strip()]
    if args.rounds is None:
        args.rounds = 1 if args.smoke else 3
    if args.requests is None:
        args.requests = 48 if args.smoke else 200
    if args.requests_c1 is None:
        args.requests_c1 = 10 if args.smoke else 40
    return args


def level_plan(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """``(concurrency, requests, warmup)`` per level; the warm-up fills every slot once."""
    plan = []
    for c in args.levels:
        n = args.requests_c1 if c == 1 else args.requests
        warmup = max(2, c) if args.smoke else max(10, 2 * c)
        plan.append((c, n, warmup))
    return plan


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def start_targets(
    stack: BenchStack, keys: str
) -> tuple[dict[str, RunningTarget], dict[str, dict[str, Any]]]:
    """Serve every target (one after the other) and read its idle RSS once it is listed."""
    running: dict[str, RunningTarget] = {}
    entries: dict[str, dict[str, Any]] = {}
    for key in keys:
        target = TARGETS[key]
        entry: dict[str, Any] = {
            "name": target.name,
            "description": target.description,
            "ours": target.ours,
            "levels": [],
        }
        entries[key] = entry
        print(f"bench: ({key}) starting {target.description}", flush=True)
        t0 = time.monotonic()
        try:
            rt = stack.serve(target)
        except Exception as exc:  # noqa: BLE001 - one failing target must not hide the others
            entry["error"] = f"{type(exc).__name__}: {exc}"
            print(f"  ({key}) FAILED: {entry['error'][:2000]}", file=sys.stderr, flush=True)
            continue
        running[key] = rt
        entry["startup_s"] = round(time.monotonic() - t0, 2)
        entry["model"] = rt.model
        entry["argv"] = rt.proc.argv
        time.sleep(SETTLE_S)
        entry["idle_rss_kib"] = rt.rss_kib()
    return running, entries


def measure(
    stack: BenchStack,
    running: dict[str, RunningTarget],
    entries: dict[str, dict[str, Any]],
    plan: list[tuple[int, int, int]],
    *,
    rounds: int,
    max_tokens: int,
) -> None:
    """Load one target at a time: per round, per level, every target in turn.

    Interleaving (instead of all levels of one target, then the next) spreads any change in
    background load on this shared machine over all targets alike; each round rotates the
    order. The rounds of a level are pooled: throughput = tokens / summed wall time.
    """
    pooled: dict[tuple[str, int], list[LevelResult]] = {}
    keys = list(running)
    for r in range(rounds):
        order = keys[r % len(keys) :] + keys[: r % len(keys)] if keys else []
        for c, n, warmup in plan:
            for key in order:
                if not running[key].proc.running:
                    entries[key].setdefault("error", "worker exited during the benchmark")
                    continue
                level = _run(
                    run_level(
                        stack.base_url,
                        running[key].model,
                        concurrency=c,
                        requests=n,
                        warmup=warmup,
                        max_tokens=max_tokens,
                    )
                )
                pooled.setdefault((key, c), []).append(level)
                s = level.summary()
                print(
                    f"  round {r + 1}/{rounds} ({key}) c={c:<3} "
                    f"{s['output_tokens_per_s'] or 0:9.0f} tok/s  errors {s['errors']}",
                    flush=True,
                )
    for key in keys:
        for c, _n, warmup in plan:
            levels = pooled.get((key, c))
            if not levels:
                continue
            merged = LevelResult(
                concurrency=c,
                requests=sum(lv.requests for lv in levels),
                wall_s=sum(lv.wall_s for lv in levels),
                results=[res for lv in levels for res in lv.results],
            )
            summary = merged.summary()
            summary["warmup"] = warmup
            summary["rounds_output_tokens_per_s"] = [
                lv.summary()["output_tokens_per_s"] for lv in levels
            ]
            entries[key]["levels"].append(summary)
        entries[key]["loaded_rss_kib"] = running[key].rss_kib()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    frontend_python = args.frontend_python or find_frontend_python()
    if frontend_python is None:
        print(
            "error: no Dynamo frontend venv: run `make frontend` or set DYNAMO_FRONTEND_PYTHON",
            file=sys.stderr,
        )
        return 2
    plan = level_plan(args)
    result: dict[str, Any] = {
        "timestamp": timestamp(),
        "smoke": args.smoke,
        "config": {
            "levels": [{"concurrency": c, "requests": n, "warmup": w} for c, n, w in plan],
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "prompt_words": len(PROMPT.split()),
            "stream": True,
            "connection": CONNECTION_MODE,
            "stack": "etcd discovery, tcp request plane, NATS event plane, 127.0.0.1",
        },
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_at_start": list(os.getloadavg()),
        },
        "targets": {},
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = (args.workdir or Path(tmp)).absolute()
        workdir.mkdir(parents=True, exist_ok=True)
        model_dir = write_tiny_model(workdir / "model" / "tiny")
        print(f"bench: stack in {workdir}; targets {args.targets}; plan {plan}", flush=True)
        with BenchStack(workdir, frontend_python, model_dir) as stack:
            running: dict[str, RunningTarget] = {}
            try:
                running, entries = start_targets(stack, args.targets)
                result["targets"] = entries
                measure(
                    stack,
                    running,
                    entries,
                    plan,
                    rounds=args.rounds,
                    max_tokens=args.max_tokens,
                )
            finally:
                for rt in running.values():
                    rt.stop()
    result["duration_s"] = round(time.monotonic() - started, 1)
    result["ratios"] = ratios(result["targets"])
    result["goals"] = check_goals(result["ratios"])
    paths = write_results(result, args.out)
    print()
    print(format_table(result))
    print(f"\nwrote {paths['json']} (and latest.json), chart {paths['chart']}")
    failed = any(
        t.get("error") or any(lv["errors"] for lv in t["levels"])
        for t in result["targets"].values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench``: backend_common's workers vs Dynamo's own, behind one real frontend.

Serves the targets of ``bench.targets`` behind the same frontend (etcd discovery, tcp request
plane, NATS events, all on 127.0.0.1) and loads them one after the other with
``bench.load.run_level``: per round, per concurrency level, each target in turn (only one is
under load at a time; the others sit idle). The rounds of a level are pooled. Around each
measured level it reads the worker's CPU time (utime + stime of its process tree) and samples
its RSS. It writes ``bench/results/<timestamp>.json`` + ``latest.json`` and a PNG chart (the
scratch output), then prints a table. ``python -m bench.publish`` turns one result into the
committed docs/benchmark.md and the README's table. Nothing is asserted about the numbers:
the goals are reported as met / not met.

``--pairs e/f`` adds the vLLM pair (our ``engine_kind=vllm`` worker against Dynamo's
``dynamo.vllm``, ``bench.vllm_pair``): it runs only when asked, in its own stack with its own
model and result file, because it alone takes about ten minutes.

``--smoke`` is the quick variant the test suite runs (targets a and c, few requests, ~20 s).
Exit status: 0 when every target ran with zero failed requests, 1 otherwise, 2 for a setup
problem (no frontend venv).

Requires the Dynamo frontend venv (``$DYNAMO_FRONTEND_PYTHON`` or ``.venv-dynamo``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from backend_common.devstack.frontend import find_frontend_python
from backend_common.devstack.tinymodel import write_tiny_model

from .aiperf import AIPERF_VERSION, AiperfError, aiperf_command, compare, ensure_aiperf, run_aiperf
from .aiperf import DEFAULT_VENV as AIPERF_VENV
from .load import CONNECTION_MODE, PROMPT, LevelResult, run_level
from .report import (
    check_goals,
    format_table,
    frontend_ceiling,
    ratios,
    timestamp,
    write_results,
)
from .targets import (
    PAIRS,
    REPO,
    TARGETS,
    BenchStack,
    PeakRss,
    ProcessStats,
    RunningTarget,
    Target,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SETTLE_S = 1.0  # after the model is listed, before reading idle RSS
DEFAULT_LEVELS = (1, 16, 64, 256, 512, 1024)
HIGH_LEVEL = 256  # above it, fewer counted requests per slot (see level_plan)
AIPERF_LEVEL = 64  # the level aiperf measures by default (one run per target)
AIPERF_TIMEOUT_S = 600.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="quick run: targets a,c; few requests")
    p.add_argument(
        "--targets",
        help=f"comma-separated targets (default {','.join(TARGETS)}; smoke: a,c)",
    )
    p.add_argument(
        "--concurrency",
        help=f"comma-separated levels (default {','.join(map(str, DEFAULT_LEVELS))}; smoke: 1,16)",
    )
    p.add_argument(
        "--requests",
        type=int,
        help="requests per level and round for c > 1, at least 3 per slot up to c=256 and 2 "
        "per slot above (default 200)",
    )
    p.add_argument("--requests-c1", type=int, help="requests per round at c=1 (default 40)")
    p.add_argument("--rounds", type=int, help="rounds over all levels (default 3; smoke: 1)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    p.add_argument("--workdir", type=Path, help="keep logs here (default: a temporary dir)")
    p.add_argument("--frontend-python", help="python of the Dynamo 1.6.1 frontend venv")
    p.add_argument(
        "--profile",
        type=Path,
        help="record py-spy profiles (collapsed stacks, <key>.txt) of our workers into this "
        "directory while they are measured (needs `pip install py-spy`)",
    )
    p.add_argument(
        "--aiperf-level",
        type=int,
        help="after the measured rounds, run aiperf (installed on first use into "
        ".venv-aiperf) against every target at this concurrency and publish its figures "
        "next to ours (default 64; smoke: off)",
    )
    p.add_argument("--no-aiperf", action="store_true", help="skip the aiperf cross-check")
    p.add_argument("--aiperf-venv", type=Path, default=AIPERF_VENV, help=argparse.SUPPRESS)
    p.add_argument(
        "--pairs",
        help="comma-separated pairs to run instead of --targets: "
        + ", ".join(f"{a}/{b}" for a, b in PAIRS)
        + ". e/f (the vLLM pair of bench.vllm_pair, about 10 minutes; installs Dynamo's "
        "vLLM worker on first use) runs only when named here",
    )
    args = p.parse_args(argv)
    args.vllm_pair = False
    if args.pairs is not None:
        names = [x.strip() for x in args.pairs.split(",") if x.strip()]
        # e/f has its own targets (bench.vllm_pair), outside TARGETS.
        known = {f"{a}/{b}": (a, b) for a, b in PAIRS if a in TARGETS and b in TARGETS}
        bad = [n for n in names if n not in known and n != "e/f"]
        if bad:
            p.error(f"unknown pairs {bad}; choose from {', '.join(f'{a}/{b}' for a, b in PAIRS)}")
        args.vllm_pair = "e/f" in names
        if args.targets is None:
            args.targets = ",".join(k for n in names if n in known for k in known[n])
    keys = (
        args.targets if args.targets is not None else ("a,c" if args.smoke else ",".join(TARGETS))
    )
    args.targets = [k.strip() for k in keys.split(",") if k.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        p.error(f"unknown targets {sorted(unknown)}; choose from {','.join(TARGETS)}")
    levels = args.concurrency or ("1,16" if args.smoke else ",".join(map(str, DEFAULT_LEVELS)))
    args.levels = [int(x) for x in levels.split(",") if x.strip()]
    if args.rounds is None:
        args.rounds = 1 if args.smoke else 3
    if args.requests is None:
        args.requests = 48 if args.smoke else 200
    if args.requests_c1 is None:
        args.requests_c1 = 10 if args.smoke else 40
    if args.no_aiperf or (args.smoke and args.aiperf_level is None):
        args.aiperf_level = None
    elif args.aiperf_level is None:
        args.aiperf_level = AIPERF_LEVEL
    return args


def level_plan(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """``(concurrency, requests, warmup)`` per level; the warm-up fills every slot once.

    Every slot serves at least ``per_slot(c)`` counted requests, so each level's wall time
    covers several generations of streams; above ``HIGH_LEVEL`` two per slot keep the run
    (all targets, three rounds) under 15 minutes on the 2-core machine docs/benchmark.md
    describes. Each request is bounded by the load generator's timeout, so a level ends within
    ``ceil(requests / c) * timeout`` seconds whatever the worker does.
    """
    plan = []
    for c in args.levels:
        per_slot = 3 if c <= HIGH_LEVEL else 2
        n = args.requests_c1 if c == 1 else max(args.requests, per_slot * c)
        warmup = max(2, c) if args.smoke else max(10, c)
        plan.append((c, n, warmup))
    return plan


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def start_targets(
    stack: BenchStack, keys: list[str], catalog: dict[str, Target] | None = None
) -> tuple[dict[str, RunningTarget], dict[str, dict[str, Any]]]:
    """Serve every target (one after the other) and read its idle RSS once it is listed;
    ``catalog`` holds the targets by key (default ``TARGETS``)."""
    running: dict[str, RunningTarget] = {}
    entries: dict[str, dict[str, Any]] = {}
    for key in keys:
        target = (catalog or TARGETS)[key]
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
        entry["launch"] = rt.launch.command_line()
        print(f"  ({key}) launch: {entry['launch']}", flush=True)
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
    request_extra: dict[str, Any] | None = None,
) -> None:
    """Load one target at a time: per round, per level, every target in turn
    (``request_extra``: top-level fields added to every request).

    Interleaving (instead of all levels of one target, then the next) spreads any change in
    background load on this shared machine over all targets alike; each round rotates the
    order. The rounds of a level are pooled: throughput = tokens / summed wall time.
    """
    pooled: dict[tuple[str, int], list[LevelResult]] = {}
    cpu: dict[tuple[str, int], list[dict[str, float]]] = {}
    peaks: dict[str, int] = {}
    keys = list(running)
    for r in range(rounds):
        order = keys[r % len(keys) :] + keys[: r % len(keys)] if keys else []
        for c, n, warmup in plan:
            for key in order:
                if not running[key].proc.running:
                    entries[key].setdefault("error", "worker exited during the benchmark")
                    continue
                rt = running[key]
                level, cpu_s, peak = _run(
                    _measured_level(rt, stack, c, n, warmup, max_tokens, request_extra)
                )
                pooled.setdefault((key, c), []).append(level)
                cpu.setdefault((key, c), []).append(cpu_s)
                if peak is not None:
                    peaks[key] = max(peaks.get(key, 0), peak)
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
            tokens = summary["output_tokens"]
            wait_s = sum(x["worker_runq_wait"] for x in cpu[(key, c)])
            summary["worker_runq_wait_s"] = round(wait_s, 3)
            # Average number of the worker's threads that were ready but had no CPU.
            summary["worker_runq_wait_per_s"] = wait_s / summary["wall_s"]
            for role in ("worker", "frontend", "client"):
                cpu_s = sum(x[role] for x in cpu[(key, c)])
                summary[f"{role}_cpu_s"] = round(cpu_s, 3)
                summary[f"{role}_cpu_s_per_1k_tokens"] = cpu_s / tokens * 1000 if tokens else None
            summary["rounds_output_tokens_per_s"] = [
                lv.summary()["output_tokens_per_s"] for lv in levels
            ]
            entries[key]["levels"].append(summary)
        entries[key]["loaded_rss_kib"] = peaks.get(key)


async def _measured_level(
    rt: RunningTarget,
    stack: BenchStack,
    c: int,
    n: int,
    warmup: int,
    max_tokens: int,
    extra: dict[str, Any] | None = None,
) -> tuple[LevelResult, dict[str, float], int | None]:
    """One level; CPU seconds of the worker, the frontend and this client (the load
    generator) and the worker's run-queue wait over the counted requests; the worker's peak
    RSS meanwhile."""
    base_url = stack.base_url
    if warmup:
        await run_level(
            base_url,
            rt.model,
            concurrency=c,
            requests=warmup,
            warmup=0,
            max_tokens=max_tokens,
            extra=extra,
        )
    assert stack.frontend is not None and stack.frontend.pid is not None
    frontend = ProcessStats(stack.frontend.pid)
    roles = ("worker", "frontend", "client", "worker_runq_wait")

    def sample() -> tuple[float, ...]:
        return (
            rt.stats.cpu_seconds(),
            frontend.cpu_seconds(),
            time.process_time(),
            rt.stats.runqueue_wait_seconds(),
        )

    before = sample()
    with PeakRss(rt.stats) as peak:
        level = await run_level(
            base_url,
            rt.model,
            concurrency=c,
            requests=n,
            warmup=0,
            max_tokens=max_tokens,
            extra=extra,
        )
    after = sample()
    cpu = {role: b - a for role, a, b in zip(roles, before, after, strict=True)}
    return level, cpu, peak.peak_kib


def cross_check_aiperf(
    stack: BenchStack,
    running: dict[str, RunningTarget],
    entries: dict[str, dict[str, Any]],
    *,
    level: int,
    plan: list[tuple[int, int, int]],
    max_tokens: int,
    workdir: Path,
    venv: Path,
) -> dict[str, Any]:
    """aiperf against every running target at ``level`` (the plan's requests and warm-up
    there), one target at a time; each entry gets ``aiperf`` (its figures, or its error) and
    ``aiperf_vs_ours`` (``bench.aiperf.compare`` with our pooled figures at that level)."""
    n, warmup = next(((r, w) for c, r, w in plan if c == level), (max(200, 3 * level), level))
    info: dict[str, Any] = {"concurrency": level, "requests": n, "warmup": warmup}
    try:
        aiperf = ensure_aiperf(venv)
    except AiperfError as exc:
        info["error"] = str(exc)
        print(f"bench: aiperf unavailable: {exc}", file=sys.stderr, flush=True)
        return info
    info["version"] = AIPERF_VERSION
    for key, rt in running.items():
        if not rt.proc.running:
            continue
        artifacts = workdir / "aiperf" / key
        argv = aiperf_command(
            aiperf,
            url=stack.base_url,
            model=rt.model,
            tokenizer=stack.model_dir,
            concurrency=level,
            requests=n,
            warmup=warmup,
            max_tokens=max_tokens,
            artifact_dir=artifacts,
            prompt_tokens=len(PROMPT.split()),
        )
        shown = shlex.join(argv).replace(str(workdir), "$WORKDIR")
        info.setdefault("command", shown.replace(str(REPO), "."))
        print(f"bench: ({key}) aiperf at c={level}", flush=True)
        try:
            figures = run_aiperf(argv, artifact_dir=artifacts, timeout=AIPERF_TIMEOUT_S)
        except AiperfError as exc:
            entries[key]["aiperf"] = {"error": str(exc)[:2000]}
            print(f"  ({key}) aiperf FAILED: {exc}", file=sys.stderr, flush=True)
            continue
        entries[key]["aiperf"] = figures
        ours = next((lv for lv in entries[key]["levels"] if lv["concurrency"] == level), None)
        if ours is not None:
            entries[key]["aiperf_vs_ours"] = compare(ours, figures)
        print(
            f"  ({key}) aiperf {figures['output_tokens_per_s'] or 0:9.0f} tok/s  "
            f"TTFT p50 {figures['ttft_ms_p50'] or 0:.1f} ms  errors {figures['errors']}",
            flush=True,
        )
    return info


def start_profilers(running: dict[str, RunningTarget], out: Path) -> list[subprocess.Popen]:
    """One ``py-spy record --pid`` per worker of ours; stopped (and written) by SIGINT."""
    import shutil

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for key, rt in running.items():
        if not rt.target.ours:
            continue
        argv = [spy, "record", "--pid", str(rt.proc.pid), "--rate", "250", "--format", "raw"]
        argv += ["--output", str(out / f"{key}.txt")]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def stop_profilers(procs: list[subprocess.Popen]) -> None:
    import signal

    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _versions() -> dict[str, str | None]:
    """Versions of what the numbers depend on (this interpreter; the frontend's separately)."""
    out: dict[str, str | None] = {}
    for dist in ("aiohttp", "uvloop", "msgpack", "nats-py", "prometheus-client"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _frontend_versions(frontend_python: str) -> dict[str, str | None]:
    code = (
        "import importlib.metadata as m, json; print(json.dumps({d: m.version(d) for d in "
        "('ai-dynamo', 'ai-dynamo-runtime')}))"
    )
    try:
        proc = subprocess.run(
            [frontend_python, "-c", code], capture_output=True, text=True, timeout=60
        )
        import json

        return json.loads(proc.stdout)
    except (OSError, ValueError, subprocess.SubprocessError):
        return {"ai-dynamo": None, "ai-dynamo-runtime": None}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    frontend_python = args.frontend_python or find_frontend_python()
    if frontend_python is None:
        print(
            "error: no Dynamo frontend venv: run `make frontend` or set DYNAMO_FRONTEND_PYTHON",
            file=sys.stderr,
        )
        return 2
    vllm_code = 0
    if args.vllm_pair:
        from .vllm_pair import run_pair

        vllm_code = run_pair(
            frontend_python,
            levels=[1, 16] if args.smoke else [1, 16, 64],
            requests=32 if args.smoke else 96,
            requests_c1=4 if args.smoke else 16,
            rounds=1 if args.smoke else 2,
            max_tokens=args.max_tokens,
            out=args.out,
            workdir=args.workdir,
            smoke=args.smoke,
            command="python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        )
        if not args.targets:
            return vllm_code
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
        "command": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "host": {
            "machine": platform.machine(),
            "cpu_model": _cpu_model(),
            "cpus": os.cpu_count(),
            "memory_gib": round(
                os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
            ),
            "os": platform.platform(),
            "python": platform.python_version(),
            "loadavg_at_start": list(os.getloadavg()),
        },
        "versions": {**_versions(), **_frontend_versions(frontend_python)},
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
            profilers: list[subprocess.Popen[bytes]] = []
            try:
                running, entries = start_targets(stack, args.targets)
                result["targets"] = entries
                if args.profile is not None:
                    profilers = start_profilers(running, args.profile)
                measure(
                    stack,
                    running,
                    entries,
                    plan,
                    rounds=args.rounds,
                    max_tokens=args.max_tokens,
                )
                stop_profilers(profilers)
                if args.aiperf_level is not None:
                    result["aiperf"] = cross_check_aiperf(
                        stack,
                        running,
                        entries,
                        level=args.aiperf_level,
                        plan=plan,
                        max_tokens=args.max_tokens,
                        workdir=workdir,
                        venv=args.aiperf_venv,
                    )
            finally:
                stop_profilers(profilers)
                for rt in running.values():
                    rt.stop()
    result["duration_s"] = round(time.monotonic() - started, 1)
    result["host"]["loadavg_at_end"] = list(os.getloadavg())
    result["ratios"] = ratios(result["targets"])
    result["goals"] = check_goals(result["ratios"], result["targets"])
    result["frontend_ceiling"] = frontend_ceiling(result["targets"])
    paths = write_results(result, args.out)
    print()
    print(format_table(result))
    print(f"\nwrote {paths['json']} (and latest.json), chart {paths['chart']}")
    failed = any(
        t.get("error") or any(lv["errors"] for lv in t["levels"])
        for t in result["targets"].values()
    )
    return 1 if failed or vllm_code else 0


if __name__ == "__main__":
    sys.exit(main())

"""aiperf, the load generator Dynamo's documentation measures with, against a local stack.

Used by the repository's benchmark and by a generated project's ``make bench``
(``scripts/aiperf_bench.py``), both against workers behind the real frontend.

``ensure_aiperf(venv)`` installs ``aiperf==AIPERF_VERSION`` into the virtual environment
``venv`` (its own, e.g. ``.venv-aiperf``) the first time it is needed and returns the path of
its ``aiperf`` executable; later calls find it there at that version and install nothing. It
is never part of ``make install`` (the environment is about 1.2 GB). ``installed_aiperf(venv)``
is that executable when aiperf is already installed there at the pinned version, else None
(it installs nothing).

``aiperf_command(...)`` is the ``aiperf profile`` command line for one concurrency level:
streaming chat completions, a synthetic prompt of ``prompt_tokens`` tokens, exactly
``max_tokens`` output tokens (stddev 0), a new connection per request
(``--connection-reuse-strategy never``: on reused connections the Dynamo frontend delays the
first tokens, which would swamp the TTFT), the model directory as tokenizer and the server's
own token counts (``--use-server-token-count``: a word-level test tokenizer counts differently
from the server).

``run_aiperf(...)`` runs that command (bounded by ``timeout`` seconds; ``HF_HUB_OFFLINE`` is
removed from its environment because aiperf 0.13.0 then takes a local tokenizer path for a hub
id) and returns ``summarize(artifact_dir)``: output tokens/s, requests/s, TTFT and ITL p50/p99
(ms), the error count, the concurrency aiperf really kept and its connect time from
``profile_export_aiperf.json``, and the CPU seconds aiperf's processes used over the whole
run (their start-up included). It raises ``AiperfError`` with the tail of aiperf's output
when aiperf fails or writes no export.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "AIPERF_VERSION",
    "AiperfError",
    "aiperf_command",
    "ensure_aiperf",
    "installed_aiperf",
    "run_aiperf",
    "summarize",
]

AIPERF_VERSION = "0.13.0"
EXPORT = "profile_export_aiperf.json"
INSTALL_TIMEOUT_S = 1800.0


class AiperfError(RuntimeError):
    """aiperf could not be installed, failed, or wrote no results."""


def _installed_version(python: Path) -> str | None:
    code = "import importlib.metadata as m; print(m.version('aiperf'))"
    try:
        proc = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def installed_aiperf(venv: Path) -> Path | None:
    """The ``aiperf`` executable of ``venv`` if aiperf is installed there at ``AIPERF_VERSION``."""
    aiperf = venv / "bin" / "aiperf"
    if aiperf.is_file() and _installed_version(venv / "bin" / "python") == AIPERF_VERSION:
        return aiperf
    return None


def ensure_aiperf(venv: Path, *, python: str = sys.executable) -> Path:
    """The ``aiperf`` executable of ``venv``, installing aiperf there on first use."""
    present = installed_aiperf(venv)
    if present is not None:
        return present
    aiperf = venv / "bin" / "aiperf"
    venv_python = venv / "bin" / "python"
    print(f"bench: installing aiperf=={AIPERF_VERSION} into {venv} (first use)", flush=True)
    steps = [
        [python, "-m", "venv", str(venv)],
        [str(venv_python), "-m", "pip", "install", "-q", f"aiperf=={AIPERF_VERSION}"],
    ]
    for argv in steps:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as exc:
            raise AiperfError(f"{argv[0]} failed: {exc}") from exc
        if proc.returncode != 0:
            raise AiperfError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    if not aiperf.is_file():
        raise AiperfError(f"aiperf=={AIPERF_VERSION} installed but {aiperf} is missing")
    return aiperf


def aiperf_command(
    aiperf: Path | str,
    *,
    url: str,
    model: str,
    tokenizer: Path | str,
    concurrency: int,
    requests: int,
    warmup: int,
    max_tokens: int,
    artifact_dir: Path,
    prompt_tokens: int = 32,
    timeout: float = 60.0,  # noqa: ASYNC109 - per request
) -> list[str]:
    """``aiperf profile`` for one level (see the module docstring for why each flag)."""
    return [
        str(aiperf),
        "profile",
        "--model",
        model,
        "--url",
        url,
        "--endpoint-type",
        "chat",
        "--streaming",
        "--tokenizer",
        str(tokenizer),
        "--use-server-token-count",
        "--synthetic-input-tokens-mean",
        str(prompt_tokens),
        "--synthetic-input-tokens-stddev",
        "0",
        "--output-tokens-mean",
        str(max_tokens),
        "--output-tokens-stddev",
        "0",
        "--concurrency",
        str(concurrency),
        "--request-count",
        str(requests),
        "--warmup-request-count",
        str(warmup),
        "--connection-reuse-strategy",
        "never",
        "--request-timeout-seconds",
        f"{timeout:g}",
        "--random-seed",
        "0",
        "--ui-type",
        "none",
        "--artifact-dir",
        str(artifact_dir),
    ]


def _metric(data: dict[str, Any], name: str, stat: str) -> float | None:
    entry = data.get(name)
    if isinstance(entry, dict) and isinstance(entry.get(stat), int | float):
        return float(entry[stat])
    return None


def _find_export(artifact_dir: Path) -> Path | None:
    direct = artifact_dir / EXPORT
    if direct.is_file():
        return direct
    found = sorted(artifact_dir.rglob(EXPORT))
    return found[0] if found else None


def summarize(artifact_dir: Path) -> dict[str, Any]:
    """The figures ``bench`` publishes from one aiperf run's ``profile_export_aiperf.json``."""
    path = _find_export(artifact_dir)
    if path is None:
        raise AiperfError(f"aiperf wrote no {EXPORT} under {artifact_dir}")
    data = json.loads(path.read_text())
    errors = data.get("error_request_count")
    error_count = _metric(data, "error_request_count", "avg")
    if error_count is None and isinstance(errors, int | float):
        error_count = float(errors)
    return {
        "output_tokens_per_s": _metric(data, "output_token_throughput", "avg"),
        "requests_per_s": _metric(data, "request_throughput", "avg"),
        "ttft_ms_p50": _metric(data, "time_to_first_token", "p50"),
        "ttft_ms_p99": _metric(data, "time_to_first_token", "p99"),
        "itl_ms_p50": _metric(data, "inter_token_latency", "p50"),
        "itl_ms_p99": _metric(data, "inter_token_latency", "p99"),
        "requests": _metric(data, "request_count", "avg"),
        "errors": int(error_count or 0),
        # Why aiperf's figures can differ from bench.load's on a small machine: how many
        # requests it really kept in flight, and how long its client took to connect.
        "effective_concurrency": _metric(data, "effective_concurrency", "avg"),
        "connecting_ms_p50": _metric(data, "http_req_connecting", "p50"),
        "duration_s": _metric(data, "benchmark_duration", "avg"),
    }


def run_aiperf(argv: list[str], *, artifact_dir: Path, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
    """Run ``argv`` (from ``aiperf_command``), at most ``timeout`` s; its ``summarize``."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    artifact_dir.mkdir(parents=True, exist_ok=True)
    log = artifact_dir / "aiperf.log"
    before = _children_cpu_s()
    try:
        with log.open("wb") as out:
            proc = subprocess.run(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout
            )
    except subprocess.TimeoutExpired as exc:
        raise AiperfError(f"aiperf ran past {timeout:g} s; log: {log}") from exc
    except OSError as exc:
        raise AiperfError(f"cannot run aiperf: {exc}") from exc
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise AiperfError(f"aiperf exited {proc.returncode}: {tail}")
    figures = summarize(artifact_dir)
    # aiperf's own processes (each waited for by its parent, so counted here once aiperf is):
    # what the load generator itself cost over the whole run, its start-up included.
    figures["client_cpu_s"] = round(_children_cpu_s() - before, 3)
    return figures


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime

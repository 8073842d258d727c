"""``make gpu-check``: the transformers engine on an NVIDIA GPU, in one short run.

1. Greedy parity: 8 concurrent requests of different prompt lengths through the engine
   (``--device cuda``) equal ``model.generate()`` on the same device, token for token.
2. Load: 16 concurrent requests of ``--max-tokens`` each; prints output tok/s and the
   peak GPU memory (``torch.cuda.max_memory_allocated``).

The model is ``--model-path`` (e.g. a downloaded Qwen3-0.6B directory) or, by default, a
tiny random-weight Llama written to a temporary directory. Exit status 1 when parity
fails, 2 when no CUDA device is present (``--allow-cpu`` runs the same checks on the CPU:
a dry run of this script on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from backend_common import GenerateContext, PreprocessedRequest
from backend_common.devstack.tinyllm import write_tiny_causal_lm
from transformers import AutoModelForCausalLM

from transformers_cpu.engine import TransformersCpuEngine  # noqa: E402


async def collect(engine: Any, prompt: list[int], max_tokens: int) -> list[int]:
    req = PreprocessedRequest.model_validate(
        {
            "token_ids": prompt,
            "stop_conditions": {"max_tokens": max_tokens, "ignore_eos": True},
            "sampling_options": {"temperature": 0.0},
        }
    )
    tokens: list[int] = []
    async for item in engine.generate(req, GenerateContext()):
        tokens += item.token_ids
    return tokens


def prompts(n: int, bos: int, vocab: int) -> list[list[int]]:
    return [
        [bos] + [(97 * i + 13 * j) % (vocab - 10) + 3 for j in range(4 + 9 * i)] for i in range(n)
    ]


async def check(model_path: Path, device: str, max_tokens: int) -> dict[str, Any]:
    argv = ["--model-path", str(model_path), "--device", device]
    engine, _ = TransformersCpuEngine.from_args(argv)
    await engine.start(1)
    try:
        info, core = engine.info, engine.core
        assert info is not None and core is not None
        bos = info.bos_id if info.bos_id is not None else 1
        batch = prompts(8, bos, info.vocab_size)
        got = await asyncio.gather(*(collect(engine, p, 16) for p in batch))
        reference: Any = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=core._model.dtype, attn_implementation="sdpa"
        )
        reference = reference.to(device)
        equal = 0
        for prompt, tokens in zip(batch, got, strict=True):
            with torch.no_grad():
                out = reference.generate(
                    torch.tensor([prompt], device=device),
                    max_new_tokens=16,
                    min_new_tokens=16,
                    do_sample=False,
                    pad_token_id=0,
                )
            equal += out[0, len(prompt) :].tolist() == tokens
        del reference
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        load = prompts(16, bos, info.vocab_size)
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(collect(engine, p, max_tokens) for p in load))
        wall = time.perf_counter() - t0
        generated = sum(len(o) for o in outs)
        peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
        return {
            "device": info.device,
            "dtype": info.dtype,
            "kv_blocks": info.kv_total_blocks,
            "kv_block_size": info.kv_block_size,
            "parity_equal": equal,
            "parity_requests": len(batch),
            "c16_output_tokens": generated,
            "c16_wall_s": round(wall, 3),
            "c16_output_tok_s": round(generated / wall, 1),
            "peak_gpu_memory_gib": round(peak / 2**30, 3) if peak is not None else None,
        }
    finally:
        await engine.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", type=Path)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU without a GPU")
    args = ap.parse_args(argv)
    if torch.cuda.is_available():
        device = "cuda"
    elif args.allow_cpu:
        device = "cpu"
    else:
        print("gpu-check: no CUDA device (use --allow-cpu for a dry run)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        model_path = args.model_path or write_tiny_causal_lm(Path(tmp) / "model")
        result = asyncio.run(check(model_path, device, args.max_tokens))
    print(json.dumps(result, indent=2))
    return 0 if result["parity_equal"] == result["parity_requests"] else 1


if __name__ == "__main__":
    sys.exit(main())

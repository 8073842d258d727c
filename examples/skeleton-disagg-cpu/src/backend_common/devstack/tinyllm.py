"""A tiny random-weight causal LM directory: a real model for CPU tests, built offline.

Contract: ``write_tiny_causal_lm(out_dir)`` writes the tokenizer-only model of
``tinymodel.write_tiny_model`` (same vocabulary, chat template, EOS) plus random weights of
the Llama that its ``config.json`` describes (2 layers, hidden size 64, about 0.35 M
parameters, 1.4 MB of safetensors), seeded, so the same call writes the same weights.
Any Hugging Face loader (``AutoModelForCausalLM.from_pretrained``) and the Dynamo
frontend (tokenizer, chat template) accept the directory; nothing is downloaded.

Needs ``torch`` and ``transformers`` (imported on call, not at import).
CLI: ``python -m backend_common.devstack.tinyllm OUT_DIR [--seed N] [--context-length L]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .tinymodel import write_tiny_model

__all__ = ["write_tiny_causal_lm"]


def write_tiny_causal_lm(out_dir: Path, *, seed: int = 0, context_length: int = 2048) -> Path:
    """Write tokenizer, config and random weights into ``out_dir``; return it (absolute)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = write_tiny_model(out_dir, context_length=context_length)
    config = AutoConfig.from_pretrained(out)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m backend_common.devstack.tinyllm",
        description="Write a tiny random-weight Llama (tokenizer + weights) for CPU tests.",
    )
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--context-length", type=int, default=2048)
    args = ap.parse_args(argv)
    out = write_tiny_causal_lm(args.out_dir, seed=args.seed, context_length=args.context_length)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

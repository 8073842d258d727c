"""A tiny random-weight causal LM directory: a real model for CPU tests, built offline.

Contract: ``write_tiny_causal_lm(out_dir)`` writes the tokenizer-only model of
``tinymodel.write_tiny_model`` (same vocabulary, chat template, EOS) plus random weights of
the Llama that its ``config.json`` describes (2 layers, hidden size 64, about 0.35 M
parameters, 1.4 MB of safetensors), seeded, so the same call writes the same weights.
Any Hugging Face loader (``AutoModelForCausalLM.from_pretrained``) and the Dynamo
frontend (tokenizer, chat template) accept the directory; nothing is downloaded.

``write_tiny_llama(out_dir)`` writes a tiny Llama that vLLM's CPU attention accepts
(head size 64: hidden size 128, 2 heads, intermediate size 256, 2 layers) with a byte-level
BPE tokenizer (``ByteLevelBPE``, trained here in well under a second on a fixed corpus,
so every string, ``{`` and ``"`` included, can be spelled: guided decoding needs that), a
chat template, BOS ``<s>`` and EOS ``</s>``. Seeded and deterministic like the first one.

Needs ``torch`` and ``transformers`` (imported on call, not at import); ``write_tiny_llama``
also ``tokenizers``.
CLI: ``python -m backend_common.devstack.tinyllm OUT_DIR [--seed N] [--context-length L]
[--byte-level]`` (``--byte-level``: ``write_tiny_llama``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .tinymodel import CHAT_TEMPLATE, write_tiny_model

__all__ = ["BYTE_LEVEL_SPECIALS", "write_tiny_causal_lm", "write_tiny_llama"]

BYTE_LEVEL_SPECIALS = ("<unk>", "<s>", "</s>")
"""Special tokens of ``write_tiny_llama``'s tokenizer, at ids 0, 1 (BOS) and 2 (EOS)."""

_BYTE_LEVEL_VOCAB = 512
# What the BPE merges are learned from: words, digits and the JSON punctuation the tests
# ask for, so common pieces are single tokens; any other text still spells byte by byte.
_CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog.",
    "user : hello \nassistant : hi there, how can I help you today?",
    '{"name": "tiny", "age": 42, "tags": ["a", "b"], "ok": true, "none": null}',
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "yes no maybe red green blue one two three four five six seven eight nine ten",
    "The model writes text, numbers like 3.14 and 852-mp, and JSON objects.",
]


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


def _byte_level_tokenizer() -> Any:
    # Imported here so that importing the devstack package does not require `tokenizers`.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=BYTE_LEVEL_SPECIALS[0]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BYTE_LEVEL_VOCAB,
        special_tokens=list(BYTE_LEVEL_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def write_tiny_llama(out_dir: Path, *, seed: int = 0, context_length: int = 512) -> Path:
    """Write a byte-level-BPE tiny Llama (head size 64) into ``out_dir``; return it (absolute).

    Deterministic: the same ``seed`` writes the same tokenizer and weights. Raises
    ``ValueError`` when ``context_length < 1``. Existing files of the same names are
    overwritten.
    """
    if context_length < 1:
        raise ValueError(f"context_length must be positive, got {context_length}")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    tok = _byte_level_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    unk, bos, eos = BYTE_LEVEL_SPECIALS
    bos_id, eos_id = tok.token_to_id(bos), tok.token_to_id(eos)
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bos,
            "eos_token": eos,
            "unk_token": unk,
            "pad_token": eos,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": context_length,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        out / "special_tokens_map.json",
        {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": eos},
    )
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=context_length,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
        # Wider than the default 0.02: with it the greedy token after most prompts is BOS
        # forever; at 0.1 the output varies and the top two logprobs lie ~0.4 apart.
        initializer_range=0.1,
    )
    config.architectures = ["LlamaForCausalLM"]
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(out)
    _write_json(out / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m backend_common.devstack.tinyllm",
        description="Write a tiny random-weight Llama (tokenizer + weights) for CPU tests.",
    )
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--context-length", type=int, default=None, help="default 2048 (512 byte-level)"
    )
    ap.add_argument(
        "--byte-level",
        action="store_true",
        help="the byte-level-BPE Llama of head size 64 that vLLM's CPU attention accepts",
    )
    args = ap.parse_args(argv)
    if args.byte_level:
        out = write_tiny_llama(
            args.out_dir, seed=args.seed, context_length=args.context_length or 512
        )
    else:
        out = write_tiny_causal_lm(
            args.out_dir, seed=args.seed, context_length=args.context_length or 2048
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A tokenizer-only "model" directory that the real Dynamo 1.6.x frontend accepts.

Contract: ``write_tiny_model(out_dir)`` creates (or overwrites) ``out_dir`` with exactly
what the frontend needs to build its chat/completions preprocessor for a worker that
registers the directory (docs/wire-protocol.md#model-record-and-model-card): no weights,
only

* ``tokenizer.json``: WordLevel vocabulary ``w0 .. w{N-1}`` at ids ``0 .. N-1``, then
  ``<unk>`` = N, ``<s>`` = N+1 (BOS), ``</s>`` = N+2 (EOS); WhitespaceSplit pre-tokenizer;
  a decoder that joins tokens with single spaces (also token by token);
* ``tokenizer_config.json``: special tokens and a small ``chat_template`` (required);
* ``config.json``: ``architectures`` and ``model_type`` (required, values unchecked);
* ``generation_config.json`` and ``special_tokens_map.json`` (optional, for completeness).

Invariant: the plain words come first and N >= 2048, so every id a test engine emits
(the sample backend counts 1, 2, 3, ...; the mocker draws from [1000, 2000)) decodes to
a visible word ``wK`` and never to EOS. Needs only the ``tokenizers`` package.

CLI: ``python -m backend_common.devstack.tinymodel OUT_DIR [--words N] [--context-length L]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

MIN_WORDS = 2048
"""Ids 0..2047 must all be ordinary words (see the module invariant)."""

UNK, BOS, EOS = "<unk>", "<s>", "</s>"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }} : {{ message['content'] }} \n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def _build_tokenizer(words: int) -> Any:
    # Imported here so that importing the devstack package does not require `tokenizers`.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(words)}
    vocab[UNK] = words
    vocab[BOS] = words + 1
    vocab[EOS] = words + 2
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordLevel has no decoder of its own. A WordPiece decoder whose continuation prefix
    # never occurs puts one space between tokens, which is also right for the frontend's
    # incremental detokenization (it decodes with the previous tokens as prefix context).
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([UNK, BOS, EOS])
    return tok


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def write_tiny_model(out_dir: Path, *, words: int = MIN_WORDS, context_length: int = 2048) -> Path:
    """Write the tokenizer-only model into ``out_dir`` and return it as an absolute path.

    Raises ``ValueError`` when ``words < 2048`` or ``context_length < 1``. Existing files
    of the same names are overwritten; other files in ``out_dir`` are left alone.
    """
    if words < MIN_WORDS:
        raise ValueError(f"words must be at least {MIN_WORDS}, got {words}")
    if context_length < 1:
        raise ValueError(f"context_length must be positive, got {context_length}")
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    bos_id, eos_id = words + 1, words + 2

    _build_tokenizer(words).save(str(out / "tokenizer.json"))
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": UNK,
            "pad_token": EOS,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": context_length,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        out / "special_tokens_map.json",
        {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": EOS},
    )
    # The frontend requires "architectures" and "model_type" but does not check their
    # values; the small dimensions only keep generic config loaders happy.
    _write_json(
        out / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": words + 3,
            "max_position_embeddings": context_length,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "tie_word_embeddings": False,
        },
    )
    _write_json(out / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id})
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit status."""
    ap = argparse.ArgumentParser(
        prog="python -m backend_common.devstack.tinymodel",
        description="Write a tokenizer-only model directory for the Dynamo frontend.",
    )
    ap.add_argument("out_dir", type=Path, help="directory to create or overwrite")
    ap.add_argument("--words", type=int, default=MIN_WORDS, help=f"plain words (>= {MIN_WORDS})")
    ap.add_argument("--context-length", type=int, default=2048, help="max_position_embeddings")
    args = ap.parse_args(argv)
    try:
        out = write_tiny_model(args.out_dir, words=args.words, context_length=args.context_length)
    except ValueError as exc:
        ap.error(str(exc))
    print(f"wrote {out}: w0..w{args.words - 1}, <unk>={args.words}, </s>={args.words + 2}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The transformers engine's CLI flags, their parsed form ``HfSettings``, and the model check.

The model itself comes from the worker's shared ``--model-path`` (also what the frontend
reads the tokenizer from, so token ids agree). ``check_model_path`` runs in
``from_config``, before the worker connects anywhere: a missing directory or one that
holds no causal LM is a one-line ``InvalidArgument`` naming the path, the process exits
non-zero and nothing is registered. It reads ``config.json`` only (no torch import).

Plain Python: importing this module does not import torch or transformers.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

from backend_common.args.engine_args import (
    add_dataclass_args,
    dataclass_from_args,
    fraction,
    option,
    positive_int,
)
from backend_common.errors import invalid_arg

__all__ = ["HfSettings", "add_hf_args", "check_model_path", "settings_from_args"]

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _device(text: str) -> str:
    if text in DEVICES or text.startswith("cuda:"):
        return text
    raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text}")


@dataclass(frozen=True)
class HfSettings:
    """Everything the engine core is configured with: one field per flag, declared once.

    ``model_path`` has no flag of its own: it is the worker's ``--model-path``, checked.
    """

    model_path: str = ""
    device: str = option(
        "auto", parse=_device, help="auto (cuda when available), cpu, cuda or cuda:N"
    )
    dtype: str = option(
        "auto",
        choices=DTYPES,
        help="weights and KV cache dtype; auto: the checkpoint's on CUDA, float32 on the CPU",
    )
    max_num_seqs: int = option(
        64, parse=positive_int, help="most requests in one forward pass (the rest wait)"
    )
    max_batch_tokens: int | None = option(
        None,
        parse=positive_int,
        help="token budget of one forward pass (default: sized from memory by transformers)",
    )
    block_size: int = option(64, parse=positive_int, help="KV cache block (page) size in tokens")
    num_kv_blocks: int | None = option(
        None,
        parse=positive_int,
        help="KV cache size in blocks (default: a fraction of free memory, see below)",
    )
    kv_memory_fraction: float = option(
        0.8,
        parse=fraction(zero=False, one=True),
        help="on CUDA without --num-kv-blocks: share of free GPU memory for the KV cache, "
        "in (0, 1] (1: all of it)",
    )
    context_length: int | None = option(
        None,
        parse=positive_int,
        help="max prompt + output tokens (default: the model's max_position_embeddings)",
    )
    enable_prefix_caching: bool = option(
        True, help="reuse the KV blocks of identical prompt prefixes"
    )
    seed: int = option(0, parse=int, help="seed of unseeded sampled requests")
    cpu_threads: int = option(
        0,
        parse=int,
        help="torch intra-op threads (0: torch's default, one per core); 1 is fastest for "
        "small models on a shared or busy machine",
    )


def add_hf_args(parser: argparse.ArgumentParser, *, default_device: str = "auto") -> None:
    add_dataclass_args(
        parser,
        HfSettings,
        "transformers engine (a Hugging Face causal LM)",
        defaults={"device": default_device},
    )


def check_model_path(model_path: str | None) -> str:
    """The local model directory for ``model_path``; ``InvalidArgument`` when it is not one.

    A path that does not exist locally but looks like a hub id (``org/name``) is fetched
    with ``huggingface_hub.snapshot_download`` (needs network access) and its local
    directory returned.
    """
    if not model_path:
        raise invalid_arg("--model-path is required: a Hugging Face causal LM directory")
    path = Path(model_path).expanduser()
    if not path.exists() and _looks_like_hub_id(model_path):
        path = _download(model_path)
    if not path.is_dir():
        raise invalid_arg(
            f"--model-path {model_path}: no such directory (expected a Hugging Face causal LM "
            "directory with config.json and weights)"
        )
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise invalid_arg(
            f"--model-path {model_path}: cannot read {config_file.name} "
            f"({exc.__class__.__name__}); expected a Hugging Face causal LM directory"
        ) from None
    architectures = config.get("architectures") or []
    if not any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise invalid_arg(
            f"--model-path {model_path}: config.json architectures {architectures} hold no causal "
            "LM (expected e.g. LlamaForCausalLM)"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise invalid_arg(
            f"--model-path {model_path}: no weights (*.safetensors or *.bin) in the directory"
        )
    return str(path.absolute())


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not text.startswith((".", "~"))
        and os.environ.get("HF_HUB_OFFLINE", "") not in ("1", "true", "True")
    )


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id))
    except Exception as exc:  # noqa: BLE001 - any failure is the same answer to the user
        raise invalid_arg(
            f"--model-path {repo_id}: not a local directory, and downloading it from the "
            f"Hugging Face hub failed ({exc.__class__.__name__})"
        ) from None


def settings_from_args(args: argparse.Namespace, model_path: str) -> HfSettings:
    return dataclass_from_args(HfSettings, args, model_path=model_path)

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

from backend_common.errors import invalid_arg

__all__ = ["HfSettings", "add_hf_args", "check_model_path", "settings_from_args"]

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class HfSettings:
    """Everything the engine core is configured with (one field per flag)."""

    model_path: str = ""
    device: str = "auto"
    dtype: str = "auto"
    max_num_seqs: int = 64
    max_batch_tokens: int | None = None
    block_size: int = 64
    num_kv_blocks: int | None = None
    kv_memory_fraction: float = 0.8
    context_length: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    cpu_threads: int = 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _device(text: str) -> str:
    if text in DEVICES or text.startswith("cuda:"):
        return text
    raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text}")


def add_hf_args(parser: argparse.ArgumentParser, *, default_device: str = "auto") -> None:
    d = HfSettings()
    g = parser.add_argument_group("transformers engine (a Hugging Face causal LM)")
    g.add_argument(
        "--device",
        type=_device,
        default=default_device,
        help="auto (cuda when available), cpu, cuda or cuda:N",
    )
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default=d.dtype,
        help="weights and KV cache dtype; auto: the checkpoint's on CUDA, float32 on the CPU",
    )
    g.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=d.max_num_seqs,
        help="most requests in one forward pass (the rest wait)",
    )
    g.add_argument(
        "--max-batch-tokens",
        type=_positive_int,
        default=None,
        help="token budget of one forward pass (default: sized from memory by transformers)",
    )
    g.add_argument(
        "--block-size",
        type=_positive_int,
        default=d.block_size,
        help="KV cache block (page) size in tokens",
    )
    g.add_argument(
        "--num-kv-blocks",
        type=_positive_int,
        default=None,
        help="KV cache size in blocks (default: a fraction of free memory, see below)",
    )
    g.add_argument(
        "--kv-memory-fraction",
        type=_fraction,
        default=d.kv_memory_fraction,
        help="on CUDA without --num-kv-blocks: share of free GPU memory for the KV cache",
    )
    g.add_argument(
        "--context-length",
        type=_positive_int,
        default=None,
        help="max prompt + output tokens (default: the model's max_position_embeddings)",
    )
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=d.enable_prefix_caching,
        help="reuse the KV blocks of identical prompt prefixes",
    )
    g.add_argument("--seed", type=int, default=d.seed, help="seed of unseeded sampled requests")
    g.add_argument(
        "--cpu-threads",
        type=int,
        default=d.cpu_threads,
        help="torch intra-op threads (0: torch's default, one per core); 1 is fastest for "
        "small models on a shared or busy machine",
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
    return HfSettings(
        model_path=model_path,
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_batch_tokens=args.max_batch_tokens,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_memory_fraction=args.kv_memory_fraction,
        context_length=args.context_length,
        enable_prefix_caching=args.enable_prefix_caching,
        seed=args.seed,
        cpu_threads=args.cpu_threads,
    )

"""The mocker's own CLI flags and their parsed form, ``MockerSettings``.

Names and defaults follow Dynamo's mocker where it has the flag. The
engine class wires them into the package's ``args.py`` (shared by every
engine kind): its ``add_args(parser)`` calls ``add_mocker_args`` next to
``add_common_args``, and its ``from_config(args, worker_config)`` calls
``build_engine(args, worker_config, cls)``.

``default_device`` is a parameter (not an import-time probe of torch) so this
file stays plain Python and cheap to import: the generated project passes
``"cuda"`` when it was generated for CUDA, and ``"cuda"`` still falls back to
CPU with a warning on a machine without a GPU (see ``device.py``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backend_common.config import WorkerConfig

__all__ = [
    "DEFAULT_MODEL_NAME",
    "MockerSettings",
    "add_mocker_args",
    "build_engine",
    "settings_from_args",
]

DEFAULT_MODEL_NAME = "mocker-model"
DEFAULT_BLOCK_SIZE = 64


@dataclass(frozen=True)
class MockerSettings:
    """Everything the mocker engine is configured with (one field per flag)."""

    block_size: int = DEFAULT_BLOCK_SIZE
    num_gpu_blocks: int = 16384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    watermark: float = 0.01
    speedup_ratio: float = 1.0
    startup_time: float = 0.0
    context_length: int = 8192
    device: str = "cpu"
    hidden_size: int = 256
    seed: int = 0
    kv_transfer_time_ms: float = 0.0
    default_max_tokens: int = 16
    merge_lagging_tokens: bool = False


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_mocker_args(
    parser: argparse.ArgumentParser, *, default_device: str = "cpu"
) -> argparse.ArgumentParser:
    """Add the mocker's flags to ``parser`` (next to ``add_common_args``)."""
    d = MockerSettings()
    g = parser.add_argument_group("Mocker engine (simulated inference)")
    g.add_argument(
        "--block-size",
        type=_non_negative_int,
        default=d.block_size,
        help="KV cache block size in tokens (0 = the default, 64)",
    )
    g.add_argument(
        "--num-gpu-blocks-override",
        "--num-gpu-blocks",
        dest="num_gpu_blocks",
        type=_positive_int,
        default=d.num_gpu_blocks,
        help="KV cache capacity in blocks",
    )
    g.add_argument("--max-num-seqs", type=_positive_int, default=d.max_num_seqs)
    g.add_argument(
        "--max-num-batched-tokens",
        type=_positive_int,
        default=d.max_num_batched_tokens,
        help="token budget of one forward pass",
    )
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=d.enable_prefix_caching,
    )
    g.add_argument(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=d.enable_chunked_prefill,
    )
    g.add_argument(
        "--watermark",
        type=_fraction,
        default=d.watermark,
        help="fraction of KV blocks a new admission must leave free",
    )
    g.add_argument(
        "--speedup-ratio",
        type=_non_negative_float,
        default=d.speedup_ratio,
        help="wall-clock speed-up over the perf model; 0 = no delays at all",
    )
    g.add_argument(
        "--startup-time",
        type=_non_negative_float,
        default=d.startup_time,
        help="seconds start() waits, to simulate model loading",
    )
    g.add_argument(
        "--context-length",
        type=_positive_int,
        default=d.context_length,
        help="advertised context length (prompt + output)",
    )
    g.add_argument(
        "--device",
        default=default_device,
        help="where the per-pass workload runs: cuda, cuda:N, cpu or none "
        "(cuda without a GPU falls back to cpu with a warning)",
    )
    g.add_argument(
        "--hidden-size",
        type=_positive_int,
        default=d.hidden_size,
        help="width of the per-pass device matmul",
    )
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the simulated token ids")
    g.add_argument(
        "--kv-transfer-time-ms",
        type=_non_negative_float,
        default=d.kv_transfer_time_ms,
        help="decode role: simulated KV transfer time per request (divided by speedup ratio)",
    )
    g.add_argument(
        "--default-max-tokens",
        type=_positive_int,
        default=d.default_max_tokens,
        help="max_tokens for requests that do not set it",
    )
    g.add_argument(
        "--merge-lagging-tokens",
        action="store_true",
        default=d.merge_lagging_tokens,
        help="a stream that lags behind the scheduler sends every waiting token in one item "
        "(default: one token per item, like a real engine step)",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> MockerSettings:
    return MockerSettings(
        block_size=args.block_size or DEFAULT_BLOCK_SIZE,
        num_gpu_blocks=args.num_gpu_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill,
        watermark=args.watermark,
        speedup_ratio=args.speedup_ratio,
        startup_time=args.startup_time,
        context_length=args.context_length,
        device=args.device,
        hidden_size=args.hidden_size,
        seed=args.seed,
        kv_transfer_time_ms=args.kv_transfer_time_ms,
        default_max_tokens=args.default_max_tokens,
        merge_lagging_tokens=args.merge_lagging_tokens,
    )


def build_engine(args: argparse.Namespace, worker_config: WorkerConfig, engine_cls: type) -> Any:
    """Build the (not started) mocker engine ``engine_cls`` from parsed flags.

    A worker without ``--model-name``/``--model-path`` serves ``mocker-model``
    (Dynamo's mocker default); ``worker_config`` is updated to match.
    """
    if not worker_config.public_name:
        worker_config.model_name = DEFAULT_MODEL_NAME
    return engine_cls(
        settings_from_args(args),
        model=worker_config.public_name,
        mode=worker_config.disaggregation_mode,
    )

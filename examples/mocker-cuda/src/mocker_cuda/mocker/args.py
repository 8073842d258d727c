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
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from backend_common.args.engine_args import (
    add_dataclass_args,
    dataclass_from_args,
    fraction,
    non_negative_float,
    non_negative_int,
    option,
    positive_int,
)

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
    """Everything the mocker engine is configured with: one field per flag, declared once."""

    block_size: int = option(
        DEFAULT_BLOCK_SIZE,
        parse=non_negative_int,
        help="KV cache block size in tokens (0 = the default, 64)",
    )
    num_gpu_blocks: int = option(
        16384,
        parse=positive_int,
        flags=("--num-gpu-blocks-override", "--num-gpu-blocks"),
        help="KV cache capacity in blocks",
    )
    max_num_seqs: int = option(256, parse=positive_int)
    max_num_batched_tokens: int = option(
        8192, parse=positive_int, help="token budget of one forward pass"
    )
    enable_prefix_caching: bool = option(True)
    enable_chunked_prefill: bool = option(True)
    watermark: float = option(
        0.01,
        parse=fraction(zero=True, one=False),
        help="share of KV blocks a new admission must leave free, in [0, 1) "
        "(0: none held back; 1 would admit nothing)",
    )
    speedup_ratio: float = option(
        1.0,
        parse=non_negative_float,
        help="wall-clock speed-up over the perf model; 0 = no delays at all",
    )
    startup_time: float = option(
        0.0, parse=non_negative_float, help="seconds start() waits, to simulate model loading"
    )
    context_length: int = option(
        8192, parse=positive_int, help="advertised context length (prompt + output)"
    )
    device: str = option(
        "cpu",
        help="where the per-pass workload runs: cuda, cuda:N, cpu or none "
        "(cuda without a GPU falls back to cpu with a warning)",
    )
    hidden_size: int = option(256, parse=positive_int, help="width of the per-pass device matmul")
    seed: int = option(0, parse=int, help="seed of the simulated token ids")
    kv_transfer_time_ms: float = option(
        0.0,
        parse=non_negative_float,
        help="decode role: simulated KV transfer time per request (divided by speedup ratio)",
    )
    default_max_tokens: int = option(
        16, parse=positive_int, help="max_tokens for requests that do not set it"
    )
    merge_lagging_tokens: bool = option(
        False,
        switch=True,
        help="a stream that lags behind the scheduler sends every waiting token in one item "
        "(default: one token per item, like a real engine step)",
    )


def add_mocker_args(
    parser: argparse.ArgumentParser, *, default_device: str = "cpu"
) -> argparse.ArgumentParser:
    """Add the mocker's flags to ``parser`` (next to ``add_common_args``)."""
    return add_dataclass_args(
        parser,
        MockerSettings,
        "Mocker engine (simulated inference)",
        defaults={"device": default_device},
    )


def settings_from_args(args: argparse.Namespace) -> MockerSettings:
    settings = dataclass_from_args(MockerSettings, args)
    # --block-size 0 means the default block size (as Dynamo's mocker).
    return replace(settings, block_size=settings.block_size or DEFAULT_BLOCK_SIZE)


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

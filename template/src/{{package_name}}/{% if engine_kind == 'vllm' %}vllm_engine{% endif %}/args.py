"""vLLM's own engine flags on the worker's parser, and the ``AsyncEngineArgs`` built from them.

``add_vllm_args(parser)`` runs after ``backend_common.args.add_common_args`` (the
template's ``args.py``): every flag of ``AsyncEngineArgs.add_cli_args`` is added to the
same parser. Where both define a flag (``--served-model-name``), vLLM's definition wins
and feeds Dynamo's setting (``backend_common.args.flags``); vLLM's ``--model`` names the model
directory as Dynamo's ``--model-path`` does. So a launch line of ``python -m dynamo.vllm``
(``--model``, ``--served-model-name``, ``--max-model-len``, ``--enforce-eager``,
``--dtype``, ``--discovery-backend`` ...) starts this worker unchanged.

``engine_args_from(args, model_path, kv_events_endpoint)`` applies what Dynamo's own vLLM
worker sets on top of the user's flags: prefix caching on unless the user turned it off,
the tokenizer initialised (vLLM validates sampling parameters against it), request
logging off, stats on (the ``dynamo_component_*`` gauges are fed from them), and, with
prefix caching and no ``--kv-events-config`` of the user's, vLLM's ZMQ KV event publisher
bound to ``kv_events_endpoint``.

Importing this module imports vLLM (its argument classes).
"""

from __future__ import annotations

import argparse
import dataclasses

from vllm.distributed.kv_events import KVEventsConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser

__all__ = ["add_vllm_args", "engine_args_from", "vllm_dests"]

GROUP_TITLE = "vLLM engine (AsyncEngineArgs; see vLLM's documentation)"


def _vllm_parser() -> FlexibleArgumentParser:
    parser = FlexibleArgumentParser(add_help=False)
    AsyncEngineArgs.add_cli_args(parser)
    return parser


def vllm_dests() -> set[str]:
    """The namespace attributes vLLM's flags write (what ``from_cli_args`` reads)."""
    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}


def add_vllm_args(parser: argparse.ArgumentParser) -> None:
    """Add every ``AsyncEngineArgs`` flag to ``parser`` in one group (vLLM's win conflicts).

    vLLM builds its flags on its own ``FlexibleArgumentParser``; their actions are moved
    onto ``parser`` one by one, so the conflict handling that ``add_common_args`` installed
    sees each of them.
    """
    group = parser.add_argument_group(GROUP_TITLE)
    for action in _vllm_parser()._actions:
        if not action.option_strings or "-h" in action.option_strings:
            continue
        group._add_action(action)


def engine_args_from(
    args: argparse.Namespace, model_path: str, *, kv_events_endpoint: str | None
) -> AsyncEngineArgs:
    """``AsyncEngineArgs`` of the parsed flags, with Dynamo's defaults (see the module)."""
    # The model the worker resolved (``--model-path`` or vLLM's ``--model``), before vLLM
    # resolves anything: its own default model would be looked up on the hub otherwise.
    engine_args = AsyncEngineArgs.from_cli_args(
        argparse.Namespace(**{**vars(args), "model": model_path})
    )
    if engine_args.enable_prefix_caching is None:
        engine_args.enable_prefix_caching = True
    engine_args.skip_tokenizer_init = False
    engine_args.enable_log_requests = False
    engine_args.disable_log_stats = False
    if (
        engine_args.enable_prefix_caching
        and engine_args.kv_events_config is None
        and kv_events_endpoint is not None
    ):
        engine_args.kv_events_config = KVEventsConfig(
            enable_kv_cache_events=True, publisher="zmq", endpoint=kv_events_endpoint, topic=""
        )
    return engine_args

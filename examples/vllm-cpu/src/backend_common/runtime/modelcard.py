"""The model deployment card a worker publishes in its Model record
(docs/wire-protocol.md#model-record-and-model-card).

``build_model_card(config, engine_config, base_url=...)`` is called once by the
worker after ``engine.start()`` (and its result reused on re-registration). It
returns a ``ModelCard``:

* ``card``: the ``card_json`` dict. The frontend reads the tokenizer, the chat
  template and the HF config through the ``CheckedFile`` entries in it
  (``{"path", "checksum": "blake3:<hex>", "size"}``) and verifies each checksum.
* ``files``: served file name -> local path, for the status server.
* ``files_prefix``: the URL path under which the status server must serve ``files``
  (``/v1/metadata/{ns}/{comp}/{ep}/{slug}/_base``).

``path`` in each CheckedFile is ``{base_url}{files_prefix}/{name}`` when the worker
runs a status server (``DYN_SYSTEM_PORT`` set; works across hosts), else the
absolute local path (frontend and worker must share a filesystem).

Where the files come from: ``config.model_path``, else ``config.model_name`` when it
names an existing directory. Without either the card is *name-only* (no
tokenizer): the frontend can list such a model but not run chat/completions
preprocessing for it. ``tokenizer.json``, ``tokenizer_config.json`` and
``config.json`` are required in a model directory (InvalidArgument otherwise);
``generation_config.json``, ``special_tokens_map.json`` and ``chat_template.jinja``
are used when present. ``--custom-jinja-template`` replaces the chat template.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import blake3

from ..config import DisaggregationMode, EngineConfig, WorkerConfig
from ..errors import invalid_arg

__all__ = [
    "REQUIRED_FILES",
    "ModelCard",
    "build_model_card",
    "checked_file",
    "metadata_prefix",
    "model_type_for",
    "parse_endpoint_types",
    "slugify",
    "topology",
]

REQUIRED_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json")
GENERATION_CONFIG = "generation_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE = "chat_template.jinja"
DEFAULT_KV_BLOCK_SIZE = 16

# Endpoint type -> ModelType flag name (docs/wire-protocol.md#model-record-and-model-card).
_ENDPOINT_TYPES = {
    "chat": "Chat",
    "completions": "Completions",
    "embedding": "Embedding",
    "embeddings": "Embedding",
    "tensor": "TensorBased",
    "images": "Images",
    "image": "Images",
    "videos": "Videos",
    "video": "Videos",
    "audios": "Audios",
    "audio": "Audios",
}
# The order in which flags are printed (bit order of Dynamo's ModelType).
_FLAG_ORDER: tuple[str, ...] = ("Chat", "Completions", "Embedding", "TensorBased", "Prefill")
_FLAG_ORDER += ("Images",)
_FLAG_ORDER += ("Videos", "Audios")


@dataclass
class ModelCard:
    """``card`` (card_json), ``files`` (name -> local path) and their URL ``files_prefix``."""

    card: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)
    files_prefix: str = ""

    @property
    def slug(self) -> str:
        return self.card["slug"]

    @property
    def display_name(self) -> str:
        return self.card["display_name"]


def slugify(name: str) -> str:
    """Lower-case, every char outside ``[a-z0-9_-]`` -> ``_``; leading ``/`` dropped.

    ``/tmp/dq/tiny-model`` -> ``tmp_dq_tiny-model`` (as the 1.6.1 runtime does);
    ``Qwen/Qwen3-0.6B`` -> ``qwen_qwen3-0_6b``.
    """
    slug = re.sub(r"[^a-z0-9_-]", "_", name.lstrip("/").lower())
    return slug or "model"


def parse_endpoint_types(value: str) -> list[str]:
    """``"chat, completions"`` -> ``["Chat", "Completions"]``."""
    flags: list[str] = []
    for raw in value.split(","):
        item = raw.strip().lower()
        if not item:
            continue
        if item == "prefill":
            raise invalid_arg(
                "unknown endpoint type 'prefill' (the prefill role comes from "
                "--disaggregation-mode prefill)"
            )
        flag = _ENDPOINT_TYPES.get(item)
        if flag is None:
            raise invalid_arg(f"unknown endpoint type '{raw.strip()}'")
        if flag not in flags:
            flags.append(flag)
    if not flags:
        raise invalid_arg("endpoint_types cannot be empty")
    return flags


def model_type_for(config: WorkerConfig) -> str:
    """The card's ``model_type``: prefill -> ``Prefill``; encode -> empty; else endpoint types."""
    mode = config.disaggregation_mode
    if mode is DisaggregationMode.PREFILL:
        return "Prefill"
    if mode is DisaggregationMode.ENCODE:
        return ""
    flags = parse_endpoint_types(config.endpoint_types)
    return " | ".join(f for f in _FLAG_ORDER if f in flags)


def topology(mode: DisaggregationMode, route_to_encoder: bool = False) -> tuple[str, list]:
    """``(worker_type, needs)`` per role (docs/contract.md#disaggregated-roles); DNF ``needs``."""
    if mode is DisaggregationMode.PREFILL:
        return "prefill", [["decode", "encode"]] if route_to_encoder else [["decode"]]
    if mode is DisaggregationMode.DECODE:
        return "decode", [["prefill"]]
    if mode is DisaggregationMode.ENCODE:
        return "encode", [["prefill", "decode"], ["aggregated"]]
    return "aggregated", [["encode"]] if route_to_encoder else []


def checked_file(path: Path, url: str | None = None) -> dict[str, Any]:
    """A CheckedFile: ``{"path": url or abs path, "checksum": "blake3:<hex>", "size"}``."""
    hasher = blake3.blake3()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
            size += len(chunk)
    return {
        "path": url if url is not None else str(path.absolute()),
        "checksum": f"blake3:{hasher.hexdigest()}",
        "size": size,
    }


def metadata_prefix(ns: str, comp: str, ep: str, slug: str) -> str:
    """``/v1/metadata/{ns}/{comp}/{ep}/{slug}/_base``: where the status server serves files."""
    parts = [quote(p, safe="") for p in (ns, comp, ep, slug)]
    return "/v1/metadata/" + "/".join(parts) + "/_base"


def _model_dir(config: WorkerConfig) -> Path | None:
    if config.model_path:
        path = Path(config.model_path).expanduser()
        if not path.is_dir():
            raise invalid_arg(f"model path {config.model_path!r} is not a directory")
        return path.absolute()
    if config.model_name and Path(config.model_name).expanduser().is_dir():
        return Path(config.model_name).expanduser().absolute()
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise invalid_arg(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise invalid_arg(f"{path} must hold a JSON object")
    return data


# The structural-tag settings the 1.6.1 runtime accepts: field -> allowed values (None: bool).
_STRUCTURAL_TAG_FIELDS: dict[str, tuple[str, ...] | None] = {
    "scope": ("auto", "always"),
    "schema": ("auto", "strict"),
    "allow_tool_calls_with_structured_output": None,
    "exclude_special_tokens": None,
    "reasoning_boundary": ("auto", "structural_tag", "backend"),
    "tool_arguments_any_order": None,
}
# Written into the card with these defaults, as Dynamo's workers do (exclude_special_tokens
# only when given).
_STRUCTURAL_TAG_DEFAULTS = {
    "scope": "auto",
    "schema": "auto",
    "allow_tool_calls_with_structured_output": False,
    "reasoning_boundary": "auto",
    "tool_arguments_any_order": False,
}


def _structural_tag(config: WorkerConfig) -> dict[str, Any] | None:
    """The validated ``runtime_config.structural_tag`` object, or None when not configured."""
    st = config.structural_tag
    if st is None:
        return None
    if not isinstance(st, dict):
        raise invalid_arg("structural_tag must be a JSON object")
    out = dict(_STRUCTURAL_TAG_DEFAULTS)
    for key, value in st.items():
        if key not in _STRUCTURAL_TAG_FIELDS:
            raise invalid_arg(
                f"invalid structural_tag config: unknown field '{key}' (expected one of "
                f"{', '.join(_STRUCTURAL_TAG_FIELDS)})"
            )
        allowed = _STRUCTURAL_TAG_FIELDS[key]
        ok = isinstance(value, bool) if allowed is None else value in allowed
        if not ok:
            expected = "a boolean" if allowed is None else " or ".join(allowed)
            raise invalid_arg(
                f"invalid structural_tag config: {key}={value!r} (expected {expected})"
            )
        out[key] = value
    return out


def build_model_card(
    config: WorkerConfig,
    engine_config: EngineConfig,
    *,
    base_url: str | None,
) -> ModelCard:
    """Build the card for this worker. See the module docstring for the rules."""
    if not engine_config.model:
        raise invalid_arg("EngineConfig.model must be non-empty")
    display_name = config.display_name(engine_config)
    slug = slugify(display_name)
    prefix = metadata_prefix(config.namespace, config.component, config.endpoint, slug)
    model_dir = _model_dir(config)
    files = _CardFiles(base_url, prefix)
    card: dict[str, Any] = {
        "display_name": display_name,
        "slug": slug,
        "source_path": str(model_dir) if model_dir else (config.model_name or engine_config.model),
    }
    hf_config = _add_model_files(card, model_dir, files) if model_dir is not None else {}
    template = _chat_template(config, model_dir)
    if template is not None:
        path, is_custom = template
        card["chat_template_file"] = {
            "hf_chat_template": {"is_custom": is_custom, "file": files.add(CHAT_TEMPLATE, path)}
        }
    arch_max = hf_config.get("max_position_embeddings")
    arch_max = arch_max if isinstance(arch_max, int) and arch_max > 0 else None
    context_length = engine_config.context_length or arch_max or 0
    if arch_max is not None:
        card["architectural_max_context_length"] = arch_max
    worker_type, needs = topology(config.disaggregation_mode)
    card.update(
        {
            "context_length": context_length,
            "kv_cache_block_size": engine_config.kv_cache_block_size or DEFAULT_KV_BLOCK_SIZE,
            "migration_limit": config.migration_limit,
            "model_type": model_type_for(config),
            "model_input": "Tokens",
            "worker_type": worker_type,
            "needs": needs,
            "runtime_config": _runtime_config(config, engine_config, context_length),
            "media_decoder": None,
            "media_fetcher": None,
        }
    )
    if model_dir is not None and (model_dir / SPECIAL_TOKENS_MAP).is_file():
        card["extra_files"] = [files.add(SPECIAL_TOKENS_MAP, model_dir / SPECIAL_TOKENS_MAP)]
    return ModelCard(card=card, files=files.served, files_prefix=prefix)


class _CardFiles:
    """The card's CheckedFile entries and the files the status server must serve for them."""

    def __init__(self, base_url: str | None, prefix: str) -> None:
        self._base = f"{base_url.rstrip('/')}{prefix}" if base_url else None
        self.served: dict[str, Path] = {}

    def add(self, name: str, path: Path) -> dict[str, Any]:
        self.served[name] = path
        return checked_file(path, f"{self._base}/{quote(name)}" if self._base else None)


def _add_model_files(card: dict[str, Any], model_dir: Path, files: _CardFiles) -> dict[str, Any]:
    """The model directory's config, tokenizer and generation config; returns the HF config."""
    missing = [n for n in REQUIRED_FILES if not (model_dir / n).is_file()]
    if missing:
        raise invalid_arg(
            f"model directory {model_dir} lacks {', '.join(missing)}; the frontend needs "
            f"{', '.join(REQUIRED_FILES)} to tokenize and template requests"
        )
    card["model_info"] = {"hf_config_json": files.add("config.json", model_dir / "config.json")}
    card["tokenizer"] = {
        "hf_tokenizer_json": files.add("tokenizer.json", model_dir / "tokenizer.json")
    }
    card["prompt_formatter"] = {
        "hf_tokenizer_config_json": files.add(
            "tokenizer_config.json", model_dir / "tokenizer_config.json"
        )
    }
    if (model_dir / GENERATION_CONFIG).is_file():
        card["gen_config"] = {
            "hf_generation_config_json": files.add(GENERATION_CONFIG, model_dir / GENERATION_CONFIG)
        }
    return _read_json(model_dir / "config.json")


def _chat_template(config: WorkerConfig, model_dir: Path | None) -> tuple[Path, bool] | None:
    """``(path, is_custom)`` of the chat template: ``--custom-jinja-template``, else the
    model directory's ``chat_template.jinja``, else none."""
    if config.custom_jinja_template:
        template = Path(config.custom_jinja_template).expanduser().absolute()
        if not template.is_file():
            raise invalid_arg(f"custom chat template {config.custom_jinja_template!r} not found")
        return template, True
    if model_dir is not None and (model_dir / CHAT_TEMPLATE).is_file():
        return model_dir / CHAT_TEMPLATE, False
    return None


def _runtime_config(
    config: WorkerConfig, engine_config: EngineConfig, context_length: int
) -> dict[str, Any]:
    """The card's ``runtime_config``: serving limits, parsers, structural tags, DP ranks."""
    st = _structural_tag(config)
    local_indexer = config.enable_local_indexer and config.disaggregation_mode not in (
        DisaggregationMode.DECODE,
        DisaggregationMode.ENCODE,
    )
    runtime_config: dict[str, Any] = {
        "context_length": context_length,
        "total_kv_blocks": engine_config.total_kv_blocks,
        "max_num_seqs": engine_config.max_num_seqs,
        "max_num_batched_tokens": engine_config.max_num_batched_tokens,
        "tool_call_parser": config.tool_call_parser,
        "reasoning_parser": config.reasoning_parser,
        "tool_call_arguments_format": "json_string",
        **({"structural_tag": st} if st is not None else {}),
        "structural_tag_mode": "on" if st is not None else "off",
        "structural_tag_scope": st["scope"] if st is not None else "auto",
        "structural_tag_schema": st["schema"] if st is not None else "auto",
        "exclude_tools_when_tool_choice_none": config.exclude_tools_when_tool_choice_none,
        "data_parallel_start_rank": engine_config.data_parallel_start_rank or 0,
        "data_parallel_size": engine_config.data_parallel_size or 1,
        "enable_local_indexer": local_indexer,
        "enable_eagle": False,
    }
    if engine_config.runtime_data:
        runtime_config["runtime_data"] = dict(engine_config.runtime_data)
    return runtime_config

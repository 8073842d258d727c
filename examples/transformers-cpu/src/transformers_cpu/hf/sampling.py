"""Per-request sampling and stop rules, and the logits processor that applies them.

``RequestParams.from_request`` turns an admitted ``PreprocessedRequest`` (the worker ran
``backend_common.request_policy`` on it) into what the compute thread needs, on the event
loop, with the model's defaults for absent fields, raising a typed ``InvalidArgument`` only
for what this engine does not do. ``PerRequestSampler`` runs on the compute thread inside
``ContinuousBatchingManager``'s forward step, once per step, over the logits rows of
the requests that get a token this step.

Why a processor of our own: the manager samples with one batch-wide ``do_sample`` and
one global seed, and has no ``min_tokens`` or penalties per request. The manager is
therefore run greedy (argmax) and this processor decides each row's token itself:

* greedy rows (temperature 0) with no penalty and no ``min_tokens`` in force are left
  untouched, so the manager's argmax picks exactly what ``model.generate()`` picks;
* every other row gets, in this order: ``min_tokens`` (EOS and stop ids masked until
  that many tokens were generated), repetition penalty (HF's rule), presence and
  frequency penalties (OpenAI's rule), then for sampled rows temperature, top-k, top-p,
  min-p, and one draw from the request's own ``torch.Generator`` (seeded by ``seed``:
  the same seed gives the same tokens whatever else is in the batch). The row is then
  masked down to the chosen token, which the argmax returns.

Defaults when a field is absent follow the model's ``generation_config.json`` (a model
that ships ``do_sample: true, temperature: 0.6`` samples at 0.6 unless the request says
otherwise); a model without sampling defaults decodes greedily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from backend_common import EngineConfig, PreprocessedRequest
from backend_common.errors import invalid_arg
from backend_common.request_policy import check_request
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
)

__all__ = ["PARAMS_KWARG", "PerRequestSampler", "RequestParams", "SamplingDefaults"]

PARAMS_KWARG = "dynamo_params"
"""The ``logit_processor_kwargs`` key under which each request carries its params."""


@dataclass(frozen=True)
class SamplingDefaults:
    """The model's generation defaults (``generation_config.json``), used for absent fields."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    @classmethod
    def from_generation_config(cls, gen: Any) -> SamplingDefaults:
        def num(name: str, default: float) -> float:
            value = getattr(gen, name, None)
            return default if value is None else float(value)

        return cls(
            do_sample=bool(getattr(gen, "do_sample", False)),
            temperature=num("temperature", 1.0),
            top_p=num("top_p", 1.0),
            top_k=int(num("top_k", 0)),
            repetition_penalty=num("repetition_penalty", 1.0),
        )


@dataclass(eq=False)
class RequestParams:
    """One request's exact decoding rules (built on the loop, read on the compute thread)."""

    prompt_len: int
    max_tokens: int
    min_tokens: int = 0
    eos_ids: frozenset[int] = frozenset()
    stop_ids: frozenset[int] = frozenset()
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    # Compute thread only: the request's generator, made on first sampled token.
    generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to apply: the row is left to the manager's argmax."""
        return (
            self.greedy
            and self.repetition_penalty == 1.0
            and self.presence_penalty == 0.0
            and self.frequency_penalty == 0.0
        )

    @property
    def finish_ids(self) -> list[int]:
        """The ids that end the request (handed to the manager as its eos ids)."""
        return sorted(self.eos_ids | self.stop_ids)

    @classmethod
    def from_request(
        cls,
        request: PreprocessedRequest,
        *,
        context_length: int,
        model_eos_ids: frozenset[int],
        defaults: SamplingDefaults,
        vocab_size: int | None = None,
    ) -> RequestParams:
        """The decoding rules of an admitted ``request``, absent fields from ``defaults``.

        The worker has checked ``request`` before ``generate`` with
        ``backend_common.request_policy.check_request`` against the ``EngineConfig`` that
        ``start`` returned (prompt, vocabulary, context, token counts, sampling ranges); this
        only resolves defaults and refuses, with ``InvalidArgument``, what this engine does
        not do (``n``/``best_of`` > 1, beam search, guided decoding, logprobs, a seed torch
        cannot take). ``vocab_size`` is for callers whose ``EngineConfig`` does not state the
        vocabulary (an ``engine.py`` generated before ``TransformersEngine``): given, the
        same policy runs here with it.

        ``max_tokens`` absent means all of ``context_length - prompt_len``. EOS ids are the
        model's (generation config) plus the request's ``eos_token_ids``; stop ids are
        ``stop_token_ids``, ``stop_token_ids_hidden`` and ``stop_token_ids_visible``.
        ``ignore_eos`` drops both (Dynamo's ``apply_ignore_eos``). The finishing token is part
        of the output either way.
        """
        if vocab_size is not None:
            policy = EngineConfig(model="-", context_length=context_length, vocab_size=vocab_size)
            check_request(request, policy)
        prompt_len = len(request.token_ids)
        sc, so = request.stop_conditions, request.sampling_options
        room = context_length - prompt_len
        max_tokens = room if sc.max_tokens is None else min(sc.max_tokens, room)
        min_tokens = min(sc.min_tokens or 0, max_tokens)
        # sc.stop (stop strings): a documented no-op here; the frontend's detokenizer matches
        # them on text and ends the stream (the engine then sees a stop/kill).
        _refuse_unsupported(request)

        temperature = so.temperature
        if temperature is None:
            temperature = defaults.temperature if defaults.do_sample else 0.0
        top_k = defaults.top_k if so.top_k is None else so.top_k
        rep = (
            defaults.repetition_penalty if so.repetition_penalty is None else so.repetition_penalty
        )
        if sc.ignore_eos:
            eos_ids: frozenset[int] = frozenset()
            stop_ids: frozenset[int] = frozenset()
        else:
            eos_ids = model_eos_ids | frozenset(request.eos_token_ids)
            stop_ids = frozenset(
                (sc.stop_token_ids or [])
                + (sc.stop_token_ids_hidden or [])
                + (sc.stop_token_ids_visible or [])
            )
        return cls(
            prompt_len=prompt_len,
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            eos_ids=eos_ids,
            stop_ids=stop_ids - eos_ids,
            temperature=float(temperature),
            top_p=float(defaults.top_p if so.top_p is None else so.top_p),
            top_k=max(int(top_k), 0),  # -1 and 0 both mean off
            min_p=float(so.min_p or 0.0),
            repetition_penalty=float(rep),
            presence_penalty=float(so.presence_penalty or 0.0),
            frequency_penalty=float(so.frequency_penalty or 0.0),
            seed=so.seed,
        )


def _refuse_unsupported(request: PreprocessedRequest) -> None:
    """``InvalidArgument`` for a valid request this engine cannot honour exactly."""
    so = request.sampling_options
    for name in ("n", "best_of"):
        value = getattr(so, name)
        if value is not None and value != 1:
            raise invalid_arg(f"sampling_options.{name}={value} is not supported (only 1)")
    if so.use_beam_search:
        raise invalid_arg("beam search is not supported by this engine")
    if so.guided_decoding is not None and so.guided_decoding.model_dump(exclude_none=True):
        raise invalid_arg("guided decoding is not supported by this engine")
    if request.output_options.logprobs is not None or (
        request.output_options.prompt_logprobs is not None
    ):
        raise invalid_arg("logprobs are not supported by this engine")
    if so.seed is not None and not (0 <= so.seed < 2**63):
        raise invalid_arg(f"seed must be in [0, 2**63), got {so.seed}")


class PerRequestSampler(ContinuousBatchingLogitsProcessor):
    """The manager's only logits processor (see the module docstring). Compute thread only.

    ``prepare_tensor_args`` is called with the requests of the next forward step, in
    the order of the logits rows; ``__call__`` then processes those rows. This relies on
    synchronous batching (``use_async_batching=False``) and no CUDA graphs: the engine
    configures the manager so.
    """

    supported_kwargs: dict[str, type] = {PARAMS_KWARG: RequestParams}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self, device: torch.device, base_seed: int) -> None:
        self.device = device
        self.base_seed = base_seed
        self._draws = 0
        self._rows: list[Any] = []

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        self._rows = [fs.state for fs in requests_with_new_token]
        return torch.zeros(len(self._rows), dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rows = self._rows
        for i, state in enumerate(rows[: scores.size(0)]):
            params: RequestParams | None = state.logit_processor_kwargs.get(PARAMS_KWARG)
            if params is None:
                continue
            # initial_tokens + generated_tokens is prompt + output, also after the manager
            # re-queued (soft reset) a request and folded its output into initial_tokens.
            generated = len(state.initial_tokens) + len(state.generated_tokens) - params.prompt_len
            blocked = generated < params.min_tokens and (params.eos_ids or params.stop_ids)
            if params.plain_greedy and not blocked:
                continue
            scores[i] = self._process_row(scores[i], state, params, generated, bool(blocked))
        return scores

    def _process_row(
        self, row: torch.Tensor, state: Any, params: RequestParams, generated: int, blocked: bool
    ) -> torch.Tensor:
        row = row.clone()
        vocab = row.size(0)
        if blocked:
            ids = [t for t in params.eos_ids | params.stop_ids if t < vocab]
            row[ids] = -math.inf
        if params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
            history = list(state.initial_tokens) + list(state.generated_tokens)
            if params.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(history)), dtype=torch.long, device=row.device)
                values = row[seen]
                row[seen] = torch.where(
                    values < 0,
                    values * params.repetition_penalty,
                    values / params.repetition_penalty,
                )
            if params.presence_penalty or params.frequency_penalty:
                output = history[params.prompt_len :]
                if output:
                    counts = torch.bincount(
                        torch.tensor(output, dtype=torch.long, device=row.device), minlength=vocab
                    )[:vocab].to(row.dtype)
                    row -= params.frequency_penalty * counts
                    row -= params.presence_penalty * (counts > 0).to(row.dtype)
        if params.greedy:
            choice = int(torch.argmax(row))
        else:
            choice = self._sample(row, params)
        out = torch.full_like(row, -math.inf)
        out[choice] = 0.0
        return out

    def _sample(self, row: torch.Tensor, params: RequestParams) -> int:
        logits = row / params.temperature
        if params.top_k and params.top_k < logits.size(0):
            kth = torch.topk(logits, params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, -math.inf)
        probs = torch.softmax(logits, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop = cumulative - sorted_probs > params.top_p  # keep the smallest set reaching top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        if params.min_p > 0.0:
            probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        if params.generator is None:
            generator = torch.Generator(device=row.device)
            if params.seed is not None:
                generator.manual_seed(params.seed)
            else:
                self._draws += 1
                generator.manual_seed((self.base_seed * 1_000_003 + self._draws) % 2**63)
            params.generator = generator
        return int(torch.multinomial(probs, 1, generator=params.generator))

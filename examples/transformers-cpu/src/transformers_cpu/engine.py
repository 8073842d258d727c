"""``TransformersCpuEngine``: the engine behind this worker. This file is yours.

``copier update`` never overwrites it. The engine itself, ``TransformersEngine`` (a Hugging
Face causal LM behind transformers' continuous batching on its own compute thread, exact
per-request sampling, KV usage snapshots), lives in ``hf/``: template code that
``copier update`` keeps current. Change behaviour here by overriding its hooks at the
places marked ``# YOUR ENGINE:`` (call ``super()`` to keep what the engine does), or replace
the base class with your engine when it is ready; ``make test`` checks the contract
(``tests/test_conformance.py``) after every change.
"""

from __future__ import annotations

from backend_common import WorkerConfig

from . import args as cli
from .hf.engine import TransformersEngine

__all__ = ["TransformersCpuEngine"]


class TransformersCpuEngine(TransformersEngine):
    # YOUR ENGINE: where the model runs unless --device says otherwise ("auto": CUDA when
    # available, else the CPU, so a CUDA project's tests also run on a machine without one).
    DEFAULT_DEVICE = "auto"

    # YOUR ENGINE: override hooks here, e.g. ``health_check_payload`` or ``setup_metrics``
    # (call ``super()`` to keep the engine's own).

    @classmethod
    def from_args(
        cls,
        argv: list[str] | None = None,
    ) -> tuple[TransformersCpuEngine, WorkerConfig]:
        return cli.from_args(argv, cls)

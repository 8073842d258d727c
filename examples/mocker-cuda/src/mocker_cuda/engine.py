"""``MockerCudaEngine``: the engine behind this worker. This file is yours.

``copier update`` never overwrites it. The simulated engine itself, ``MockerEngine``
(continuous-batching scheduler, KV block pool with prefix caching, Dynamo's perf model,
a PyTorch workload per forward pass), lives in ``mocker/``: template code that
``copier update`` keeps current. Subclass hooks to change behaviour here, for example
``health_check_payload`` or ``setup_metrics`` (call ``super()`` to keep the mocker's own),
or replace the base class with your engine when it is ready; ``make test`` checks the
contract (``tests/test_conformance.py``) after every change.
"""

from __future__ import annotations

from backend_common import WorkerConfig

from . import args as cli
from .mocker.engine import MockerEngine

__all__ = ["MockerCudaEngine"]


class MockerCudaEngine(MockerEngine):
    # YOUR ENGINE: where the per-pass workload runs unless --device says otherwise (chosen at
    # generation; "cuda" falls back to cpu, with a warning, on a machine without a GPU).
    DEFAULT_DEVICE = "cuda"

    # YOUR ENGINE: override hooks here, e.g. ``health_check_payload`` or ``setup_metrics``
    # (call ``super()`` to keep the mocker's own).

    @classmethod
    def from_args(
        cls,
        argv: list[str] | None = None,
    ) -> tuple[MockerCudaEngine, WorkerConfig]:
        return cli.from_args(argv, cls)
